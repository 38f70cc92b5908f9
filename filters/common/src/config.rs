//! The one configuration error of every core: where (a field path such as
//! `providers[0].jwks.timeout_ms`) and what was wrong with it.

use std::fmt::Display;

/// A configuration refused: the field and the reason, shown as
/// `configuration: <field>: <reason>` (or without the field when the
/// document as a whole is wrong, e.g. not JSON).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("configuration: {}{reason}", field_prefix(.field))]
pub struct ConfigError {
    /// The field path, empty for the whole document.
    pub field: String,
    pub reason: String,
}

fn field_prefix(field: &str) -> String {
    if field.is_empty() {
        String::new()
    } else {
        format!("{field}: ")
    }
}

impl ConfigError {
    pub fn new(field: impl Into<String>, reason: impl Display) -> ConfigError {
        ConfigError {
            field: field.into(),
            reason: reason.to_string(),
        }
    }

    /// A document serde refused (its message names the field and where).
    pub fn json(e: &serde_json::Error) -> ConfigError {
        ConfigError::new("", e)
    }

    /// The same error one level down: `within("remote")` turns
    /// `timeout_ms` into `remote.timeout_ms`.
    pub fn within(mut self, parent: &str) -> ConfigError {
        self.field = match (parent.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => parent.to_string(),
            (false, false) if self.field.starts_with('[') => format!("{parent}{}", self.field),
            (false, false) => format!("{parent}.{}", self.field),
        };
        self
    }
}

/// A `Result` whose error is turned into a [`ConfigError`] on `field`.
pub trait Field<T> {
    fn field(self, field: &str) -> Result<T, ConfigError>;
}

impl<T, E: Display> Field<T> for Result<T, E> {
    fn field(self, field: &str) -> Result<T, ConfigError> {
        self.map_err(|e| ConfigError::new(field, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn the_message_names_the_field() {
        let e = ConfigError::new("timeout_ms", "must be at least 1")
            .within("remote")
            .within("");
        assert_eq!(e.field, "remote.timeout_ms");
        assert_eq!(
            e.to_string(),
            "configuration: remote.timeout_ms: must be at least 1"
        );
        let e = ConfigError::new("[2].id", "duplicate").within("policies");
        assert_eq!(e.field, "policies[2].id");
        assert_eq!(
            ConfigError::new("", "not JSON").to_string(),
            "configuration: not JSON"
        );
    }
}
