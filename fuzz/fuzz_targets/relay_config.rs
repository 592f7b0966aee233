//! The relay's `--config` TOML file, merged over the defaults and validated, exactly as
//! `outbox relay --config FILE` does: any text gives a configuration or an error, never a
//! panic.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(config) = outbox_fuzz::relay_config(text) {
        // A configuration that validated must be usable as it is.
        assert!(config.batch_size > 0, "validated batch_size 0: {text:?}");
    }
});
