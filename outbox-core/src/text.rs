//! The rules for short text fields every backend shares (no NUL, at most [`MAX_FIELD_LEN`]
//! bytes, names not empty): a leaf that the message model and [`rules`](crate::rules) both
//! use. [`rules`](crate::rules) re-exports them; that is their public path.

use crate::error::{Error, Result};

/// Longest accepted topic, key, header name, content type, handler key, lease name or holder,
/// or other id-like field, in UTF-8 bytes: 1024, the DynamoDB sort-key limit.
pub const MAX_FIELD_LEN: usize = 1024;

/// Check text of any length: it must not contain NUL.
///
/// # Errors
/// `InvalidInput` naming `field` when `value` contains U+0000.
pub fn check_no_nul(field: &str, value: &str) -> Result<()> {
    if value.contains('\0') {
        return Err(Error::invalid_input(format!(
            "{field} must not contain NUL characters (PostgreSQL text cannot store them)"
        )));
    }
    Ok(())
}

/// Check short text that may be empty (a message key, a content type): at most
/// [`MAX_FIELD_LEN`] bytes, no NUL.
///
/// # Errors
/// `InvalidInput` naming `field` when the rule is broken.
pub fn check_text(field: &str, value: &str) -> Result<()> {
    if value.len() > MAX_FIELD_LEN {
        return Err(Error::invalid_input(format!(
            "{field} is {} bytes long; the limit is {MAX_FIELD_LEN}",
            value.len()
        )));
    }
    check_no_nul(field, value)
}

/// Check a name (topic, header name, handler key, lease name or holder): not empty, at most
/// [`MAX_FIELD_LEN`] bytes, no NUL.
///
/// # Errors
/// `InvalidInput` naming `field` when the rule is broken.
pub fn check_name(field: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::invalid_input(format!("{field} must not be empty")));
    }
    check_text(field, value)
}
