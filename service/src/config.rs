//! Configuration loading: defaults < TOML file < environment < flags.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A configuration that could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` does not exist.
    #[error("config file {0} not found")]
    MissingFile(String),
    /// A source could not be parsed or has a wrong type.
    #[error("invalid configuration: {0}")]
    Parse(String),
    /// The values parse but make no sense together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Loads a role's configuration.
///
/// Precedence, lowest first: `T::default()`; the TOML `file` if given (it must exist);
/// environment variables `TETHER_NATS_URL` (shared by every role, as field `nats_url`) and
/// `<env_prefix><FIELD>` (e.g. `TETHER_GATEWAY_TCP_LISTEN`; nested fields use `__`);
/// then `flags`, whose `None` fields are skipped.
pub fn load_config<T, F>(file: Option<&Path>, env_prefix: &str, flags: &F) -> Result<T, ConfigError>
where
    T: DeserializeOwned + Serialize + Default,
    F: Serialize,
{
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile(path.display().to_string()));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = figment
        .merge(
            Env::raw()
                .only(&["TETHER_NATS_URL"])
                .map(|_| "nats_url".into()),
        )
        .merge(Env::prefixed(env_prefix).split("__"))
        .merge(Serialized::defaults(flags));
    figment
        .extract()
        .map_err(|e| ConfigError::Parse(e.to_string()))
}

#[cfg(test)]
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        nats_url: String,
        port: u16,
        name: String,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                nats_url: "nats://127.0.0.1:4222".into(),
                port: 1,
                name: "d".into(),
            }
        }
    }

    #[derive(Serialize)]
    struct Flags {
        #[serde(skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    }

    #[test]
    fn precedence_is_default_file_env_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "port = 7\nname = \"file\"")?;
            jail.set_env("TETHER_SAMPLE_PORT", "9");
            let loaded: Sample = load_config(
                Some(Path::new("c.toml")),
                "TETHER_SAMPLE_",
                &Flags {
                    name: Some("flag".into()),
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(loaded.port, 9);
            assert_eq!(loaded.name, "flag");
            assert_eq!(loaded.nats_url, "nats://127.0.0.1:4222");
            jail.set_env("TETHER_NATS_URL", "nats://other:1");
            let loaded: Sample = load_config(None, "TETHER_SAMPLE_", &Flags { name: None })
                .map_err(|e| e.to_string())?;
            assert_eq!(loaded.nats_url, "nats://other:1");
            assert_eq!(loaded.name, "d");
            Ok(())
        });
    }

    #[test]
    fn missing_file_and_bad_types_are_clear_errors() {
        let missing: Result<Sample, _> =
            load_config(Some(Path::new("/nonexistent.toml")), "X_", &());
        assert!(matches!(missing, Err(ConfigError::MissingFile(_))));
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "port = \"many\"")?;
            let bad: Result<Sample, _> = load_config(Some(Path::new("c.toml")), "X_", &());
            assert!(matches!(bad, Err(ConfigError::Parse(_))));
            Ok(())
        });
    }
}
