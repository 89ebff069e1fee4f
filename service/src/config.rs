//! Configuration loading: defaults < TOML file < environment < flags.

use std::collections::BTreeMap;
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
/// environment variables shared by every role, `TETHER_NATS_URL` (field `nats_url`) and
/// the NATS credentials of [`tether_nats::NatsAuth::ENV`] (`TETHER_NATS_CREDS_FILE`, …,
/// fields of the `[nats]` table); `<env_prefix><FIELD>` (e.g.
/// `TETHER_GATEWAY_TCP_LISTEN`; nested fields use `__`, e.g.
/// `TETHER_GATEWAY_NATS__CREDS_FILE`); then `flags`, whose `None` fields are skipped.
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
        .merge(Serialized::default("nats", nats_env(env_prefix)))
        .merge(
            Env::prefixed(env_prefix)
                .filter(|key| {
                    !key.as_str()
                        .to_ascii_uppercase()
                        .starts_with(NATS_ENV_TABLE)
                })
                .split("__"),
        )
        .merge(Serialized::defaults(flags));
    figment
        .extract()
        .map_err(|e| ConfigError::Parse(e.to_string()))
}

/// Role-specific variables of the `[nats]` table start with this (after the role prefix).
const NATS_ENV_TABLE: &str = "NATS__";

/// The `[nats]` table from the environment: the shared `TETHER_NATS_<FIELD>` variables,
/// overridden by `<env_prefix>NATS__<FIELD>`. Values are taken as strings, unparsed (a
/// password `12345` stays a string, which figment's own parsing would turn into a number).
fn nats_env(env_prefix: &str) -> BTreeMap<&'static str, String> {
    let mut table = BTreeMap::new();
    for (shared, field) in tether_nats::NatsAuth::ENV {
        let role = format!("{env_prefix}{NATS_ENV_TABLE}{}", field.to_ascii_uppercase());
        for var in [*shared, role.as_str()] {
            if let Some(value) = std::env::var(var).ok().filter(|v| !v.is_empty()) {
                table.insert(*field, value);
            }
        }
    }
    table
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

    #[derive(Debug, Default, Serialize, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct WithNats {
        nats_url: String,
        nats: tether_nats::NatsAuth,
    }

    #[test]
    fn nats_credentials_come_from_file_shared_env_role_env_and_flags() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[nats]\ncreds_file = \"/file.creds\"\ntls_ca_file = \"/ca.pem\"",
            )?;
            jail.set_env("TETHER_NATS_CREDS_FILE", "/shared.creds");
            jail.set_env("TETHER_NATS_PASSWORD", "12345");
            jail.set_env("TETHER_NATS_USER", "tether");
            jail.set_env("TETHER_SAMPLE_NATS__TLS_CA_FILE", "/role-ca.pem");
            jail.set_env("TETHER_NATS_TLS_CA_FILE", "/shared-ca.pem");
            // The nats-server binary override is not a credential: not read into `[nats]`.
            jail.set_env("TETHER_NATS_SERVER", "/bin/nats-server");
            let loaded: WithNats = load_config(
                Some(Path::new("c.toml")),
                "TETHER_SAMPLE_",
                &Flags { name: None },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(
                loaded.nats.creds_file.as_deref(),
                Some(Path::new("/shared.creds"))
            );
            assert_eq!(
                loaded.nats.tls_ca_file.as_deref(),
                Some(Path::new("/role-ca.pem"))
            );
            assert_eq!(loaded.nats.user.as_deref(), Some("tether"));
            assert_eq!(loaded.nats.password.as_deref(), Some("12345"));
            #[derive(Serialize)]
            struct NatsFlags {
                nats: FlagNats,
            }
            #[derive(Serialize)]
            struct FlagNats {
                creds_file: Option<String>,
            }
            let loaded: WithNats = load_config(
                Some(Path::new("c.toml")),
                "TETHER_SAMPLE_",
                &NatsFlags {
                    nats: FlagNats {
                        creds_file: Some("/flag.creds".into()),
                    },
                },
            )
            .map_err(|e| e.to_string())?;
            assert_eq!(
                loaded.nats.creds_file.as_deref(),
                Some(Path::new("/flag.creds"))
            );
            assert_eq!(
                loaded.nats.tls_ca_file.as_deref(),
                Some(Path::new("/role-ca.pem"))
            );
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
