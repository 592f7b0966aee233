//! The accounting: what was committed, what the consumer received, and the checks that turn
//! the two into figures (lost, duplicates at the broker, per-key order at first receipt,
//! duplicate effects). Kept free of I/O so the unit tests can feed it bad histories.

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

/// A message a writer committed: its id, key and per-key sequence (0, 1, 2, ... per key, in
/// commit order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// Message id.
    pub id: Uuid,
    /// Ordering key.
    pub key: String,
    /// Position within the key, in commit order.
    pub seq: u64,
}

/// One delivery the consumer received, in receipt order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Message id.
    pub id: Uuid,
    /// Key as delivered (`None` when the delivery had none).
    pub key: Option<String>,
    /// The per-key sequence carried in the headers (`None` when missing or unparsable).
    pub seq: Option<u64>,
}

/// The figures of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tally {
    /// Messages committed.
    pub messages: u64,
    /// Deliveries received.
    pub received: u64,
    /// Committed messages never received.
    pub lost: u64,
    /// Deliveries of a message already received before (broker-level duplicates).
    pub duplicates: u64,
    /// First receipts whose sequence is not above the previous first receipt of the same key.
    pub order_violations: u64,
    /// Deliveries of ids nobody committed, or whose key or sequence differ from the commit.
    pub corrupt: u64,
}

/// Count `receipts` against `sent`.
///
/// Per-key order is judged on first receipts only: for each key, the sequences of the
/// messages as they are first received must strictly increase. A later message overtaking an
/// earlier one counts once, when the earlier one finally arrives (or as lost when it never
/// does).
pub fn tally(sent: &[Sent], receipts: &[Receipt]) -> Tally {
    let by_id: HashMap<Uuid, &Sent> = sent.iter().map(|s| (s.id, s)).collect();
    let mut seen: HashSet<Uuid> = HashSet::with_capacity(sent.len());
    let mut last_first: HashMap<&str, u64> = HashMap::new();
    let mut t = Tally {
        messages: sent.len() as u64,
        received: receipts.len() as u64,
        ..Tally::default()
    };
    for r in receipts {
        let Some(s) = by_id.get(&r.id) else {
            t.corrupt += 1;
            continue;
        };
        if r.key.as_deref() != Some(s.key.as_str()) || r.seq != Some(s.seq) {
            t.corrupt += 1;
        }
        if !seen.insert(r.id) {
            t.duplicates += 1;
            continue;
        }
        match last_first.get(s.key.as_str()) {
            Some(&prev) if s.seq <= prev => t.order_violations += 1,
            _ => {
                last_first.insert(s.key.as_str(), s.seq);
            }
        }
    }
    t.lost = sent.iter().filter(|s| !seen.contains(&s.id)).count() as u64;
    t
}

/// Business effects behind the inbox: one row per handled message is expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Effects {
    /// Messages with no effect row.
    pub lost: u64,
    /// Effect rows beyond the first of their message.
    pub duplicate_effects: u64,
    /// Effect rows of ids nobody sent.
    pub unknown: u64,
}

/// Count effect rows (`effects`: the message id of every business row) against `sent` ids.
pub fn effects(sent: &[Uuid], effects: &[Uuid]) -> Effects {
    let sent: HashSet<Uuid> = sent.iter().copied().collect();
    let mut counts: HashMap<Uuid, u64> = HashMap::new();
    let mut out = Effects::default();
    for id in effects {
        if sent.contains(id) {
            *counts.entry(*id).or_default() += 1;
        } else {
            out.unknown += 1;
        }
    }
    out.duplicate_effects = counts.values().map(|c| c - 1).sum();
    out.lost = sent.iter().filter(|id| !counts.contains_key(id)).count() as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sent(keys: &[(&str, u64)]) -> Vec<Sent> {
        keys.iter()
            .map(|(k, s)| Sent {
                id: Uuid::now_v7(),
                key: (*k).to_owned(),
                seq: *s,
            })
            .collect()
    }

    fn got(s: &Sent) -> Receipt {
        Receipt {
            id: s.id,
            key: Some(s.key.clone()),
            seq: Some(s.seq),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let s = sent(&[("a", 0), ("b", 0), ("a", 1), ("b", 1)]);
        // Keys interleave freely; within a key the order holds.
        let r = vec![got(&s[1]), got(&s[0]), got(&s[3]), got(&s[2])];
        let t = tally(&s, &r);
        assert_eq!(
            t,
            Tally {
                messages: 4,
                received: 4,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn a_missing_message_is_lost() {
        let s = sent(&[("a", 0), ("a", 1), ("b", 0)]);
        let t = tally(&s, &[got(&s[0]), got(&s[2])]);
        assert_eq!(t.lost, 1);
        assert_eq!(t.order_violations, 0);
        assert_eq!(tally(&s, &[]).lost, 3);
    }

    #[test]
    fn redeliveries_are_duplicates_not_order_violations() {
        let s = sent(&[("a", 0), ("a", 1)]);
        // a0, a1, then a0 again (a stale republish): a duplicate, first receipts in order.
        let t = tally(&s, &[got(&s[0]), got(&s[1]), got(&s[0]), got(&s[1])]);
        assert_eq!((t.duplicates, t.order_violations, t.lost), (2, 0, 0));
    }

    #[test]
    fn an_overtaking_message_is_an_order_violation() {
        let s = sent(&[("a", 0), ("a", 1), ("a", 2), ("b", 0)]);
        // a2 arrives before a1: the first receipt of a1 is not above a2.
        let t = tally(&s, &[got(&s[0]), got(&s[2]), got(&s[3]), got(&s[1])]);
        assert_eq!(t.order_violations, 1);
        assert_eq!((t.lost, t.duplicates), (0, 0));
        // Reversed entirely: every first receipt after the first is a violation.
        let t = tally(&s, &[got(&s[2]), got(&s[1]), got(&s[0]), got(&s[3])]);
        assert_eq!(t.order_violations, 2);
    }

    #[test]
    fn unknown_ids_and_altered_headers_are_corrupt() {
        let s = sent(&[("a", 0), ("a", 1)]);
        let stranger = Receipt {
            id: Uuid::now_v7(),
            key: Some("a".into()),
            seq: Some(0),
        };
        let mut wrong_seq = got(&s[1]);
        wrong_seq.seq = Some(7);
        let mut no_key = got(&s[0]);
        no_key.key = None;
        let t = tally(&s, &[no_key, stranger, wrong_seq]);
        assert_eq!(t.corrupt, 3);
        assert_eq!(t.lost, 0, "both ids were received, if altered");
    }

    #[test]
    fn effects_flags_missing_doubled_and_unknown_rows() {
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
        let clean = effects(&ids, &ids);
        assert_eq!(clean, Effects::default());
        let rows = vec![ids[0], ids[0], ids[0], ids[1], ids[2], Uuid::now_v7()];
        let e = effects(&ids, &rows);
        assert_eq!(
            e,
            Effects {
                lost: 1,
                duplicate_effects: 2,
                unknown: 1
            }
        );
    }
}
