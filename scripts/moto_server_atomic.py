# moto_server with two fixes that make it behave like DynamoDB where our tests depend on it.
# scripts/services.sh installs it as $VENV/bin/moto_server_atomic (with the venv's python on
# the first line); the test suite, the benchmark and the fault suite all run it.
#
# 1. One request at a time. moto_server answers each request on a thread of its own, and moto's
#    backends take no locks: two conditional writes of one item could both succeed (seen: two of
#    32 concurrent lease acquirers won), which DynamoDB never allows. Connections are still
#    accepted on many threads (a slow request never makes a client time out connecting), but
#    each request runs behind one lock, so every request is atomic, as on DynamoDB.
#
# 2. A failed TransactWriteItems undoes only what it wrote. moto deep-copies every table the
#    transaction touches before it starts (all items and the whole stream: 432 ms and gigabytes
#    for a table of 1,800 items) and, when it fails, puts the copies in place of the live
#    tables. A stream reader's shard iterator still points at the old table's stream, so after
#    any failed transaction it never sees another record (the outbox relay's stream listener
#    went deaf). Here the tables are not copied: the items the transaction addresses are saved,
#    and on failure put back, and the stream records it wrote are dropped, as DynamoDB never
#    emits records of a cancelled transaction.
import copy
import sys
import threading

import moto.dynamodb.models as dynamodb
import moto.server as server
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table

_lock = threading.Lock()


def _atomic(app):
    def wsgi(environ, start_response):
        with _lock:
            return list(app(environ, start_response))

    return wsgi


_run_simple = server.run_simple


def _run_atomic(host, port, app, *args, **kwargs):
    return _run_simple(host, port, _atomic(app), *args, **kwargs)


class _CopyButTables:
    """The `copy` module for moto's DynamoDB backend, except that a Table is not copied."""

    def __getattr__(self, name):
        return getattr(copy, name)

    @staticmethod
    def deepcopy(x, memo=None):
        return x if isinstance(x, Table) else copy.deepcopy(x, memo)


def _addressed(backend, action):
    """(table, hash key, range key) of one TransactWriteItems action, or None."""
    _, op = next(iter(action.items()))
    table = backend.tables.get(op.get("TableName"))
    if table is None:
        return None
    key = op.get("Item") if "Item" in op else op.get("Key")
    if not isinstance(key, dict) or table.hash_key_attr not in key:
        return None
    hash_key = DynamoType(key[table.hash_key_attr])
    range_key = None
    if table.range_key_attr is not None:
        if table.range_key_attr not in key:
            return None
        range_key = DynamoType(key[table.range_key_attr])
    return table, hash_key, range_key


def _stored(table, hash_key, range_key):
    if range_key is None:
        return table.items.get(hash_key)
    return table.items.get(hash_key, {}).get(range_key)


def _restore(table, hash_key, range_key, item):
    if range_key is None:
        if item is None:
            table.items.pop(hash_key, None)
        else:
            table.items[hash_key] = item
        return
    group = table.items.get(hash_key)
    if item is None:
        if group is not None:
            group.pop(range_key, None)
            if not group:
                table.items.pop(hash_key, None)
    else:
        table.items.setdefault(hash_key, {})[range_key] = item


_transact_write_items = dynamodb.DynamoDBBackend.transact_write_items


def _transact_undoing_itself(self, transact_items):
    saved = []
    streams = {}
    for action in transact_items if isinstance(transact_items, list) else []:
        if not isinstance(action, dict) or len(action) != 1:
            continue
        addressed = _addressed(self, action)
        if addressed is None:
            continue
        table, hash_key, range_key = addressed
        saved.append((table, hash_key, range_key, copy.deepcopy(_stored(*addressed))))
        if table.stream_shard is not None:
            streams.setdefault(id(table), (table.stream_shard, len(table.stream_shard.items)))
    try:
        return _transact_write_items(self, transact_items)
    except Exception:
        for table, hash_key, range_key, item in reversed(saved):
            _restore(table, hash_key, range_key, item)
        for shard, length in streams.values():
            del shard.items[length:]
        raise


dynamodb.copy = _CopyButTables()
dynamodb.DynamoDBBackend.transact_write_items = _transact_undoing_itself
server.run_simple = _run_atomic

if __name__ == "__main__":
    sys.exit(server.main())
