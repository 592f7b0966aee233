#![doc = include_str!("../README.md")]

pub mod harness;
pub mod inbox;
pub mod lock;
pub mod relay;
pub mod store;
pub mod suite;
mod support;
pub mod transport;
pub mod tx;

pub use harness::{BusinessRecords, Fixture, NoTransaction, NoTransactions, SetupContext};
pub use libtest_mimic::{Arguments, Conclusion};
pub use suite::{
    Case, Suite, backend_cases, case_names, inbox_cases, lock_cases, relay_cases, store_cases,
    transport_cases, tx_cases,
};
pub use transport::TransportHarness;

// Adding a case: write `pub async fn name<S: TransactionalStore>(f: &Fixture<S>)` in its
// module (transport cases take a `&dyn TransportHarness`), then add one `name => module::name`
// line, with `[need]` when it needs a capability, to its group's list in `suite.rs`, and a row
// to the README's table.

#[cfg(test)]
mod tests {
    #[test]
    fn readme_lists_every_case() {
        let readme = include_str!("../README.md");
        let names = super::case_names();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "case names are unique");
        for name in names {
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md does not list case {name}"
            );
        }
    }
}
