//! What a nats-server process runs with, rendered to its config-file syntax.

use std::fmt::Write;
use std::path::PathBuf;

/// Cluster membership of one server.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Cluster name (same on every peer).
    pub name: String,
    /// This server's route port.
    pub port: u16,
    /// Route ports of every peer (may include this server's own).
    pub routes: Vec<u16>,
}

/// One user of an account, with user/password authentication and subject permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Subjects the user may publish to (wildcards allowed); empty = everything.
    pub publish: Vec<String>,
    /// Subjects the user may subscribe to (wildcards allowed); empty = everything.
    pub subscribe: Vec<String>,
    /// May publish once to the reply subject of each request it receives, whatever
    /// `publish` says (NATS `allow_responses`).
    pub allow_responses: bool,
}

/// One account (JetStream enabled) and its users. With an account configured, the server
/// requires authentication: anonymous clients are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountSpec {
    /// Account name.
    pub name: String,
    /// Its users.
    pub users: Vec<UserSpec>,
}

/// Everything one nats-server process needs.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    /// Server name (unique in a cluster).
    pub name: String,
    /// Address every listener binds to.
    pub host: String,
    /// Client port.
    pub client_port: u16,
    /// Monitoring (HTTP) port.
    pub http_port: u16,
    /// JetStream store directory; the config and log file go here too.
    pub store_dir: PathBuf,
    /// JetStream domain, for leaf-node regions.
    pub domain: Option<String>,
    /// Cluster membership, if clustered.
    pub cluster: Option<ClusterSpec>,
    /// Port accepting leaf-node connections (on a hub).
    pub leaf_listen: Option<u16>,
    /// Hub leaf ports this server connects to as a leaf node.
    pub leaf_remotes: Vec<u16>,
    /// Subjects the leaf remotes neither import nor export (a region's
    /// [`crate::subjects::regional_only`] subjects).
    pub leaf_deny: Vec<String>,
    /// An account with users and permissions; `None` = anonymous clients, no permissions.
    pub account: Option<AccountSpec>,
}

impl ServerSpec {
    /// A single JetStream node.
    pub fn single(
        name: &str,
        host: &str,
        client_port: u16,
        http_port: u16,
        store_dir: PathBuf,
    ) -> Self {
        Self {
            name: name.into(),
            host: host.into(),
            client_port,
            http_port,
            store_dir,
            domain: None,
            cluster: None,
            leaf_listen: None,
            leaf_remotes: Vec::new(),
            leaf_deny: Vec::new(),
            account: None,
        }
    }

    /// The nats-server configuration text.
    pub fn config_text(&self) -> String {
        let host = &self.host;
        let mut out = String::new();
        let _ = writeln!(out, "server_name: {}", self.name);
        let _ = writeln!(out, "listen: \"{host}:{}\"", self.client_port);
        let _ = writeln!(out, "http: \"{host}:{}\"", self.http_port);
        let _ = writeln!(out, "jetstream {{");
        let _ = writeln!(
            out,
            "  store_dir: {:?}",
            self.store_dir.join("jetstream").display().to_string()
        );
        if let Some(domain) = &self.domain {
            let _ = writeln!(out, "  domain: {domain}");
        }
        let _ = writeln!(out, "}}");
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("\"nats-route://{host}:{p}\""))
                .collect();
            let _ = writeln!(out, "cluster {{");
            let _ = writeln!(out, "  name: {}", cluster.name);
            let _ = writeln!(out, "  listen: \"{host}:{}\"", cluster.port);
            let _ = writeln!(out, "  routes: [{}]", routes.join(", "));
            let _ = writeln!(out, "}}");
        }
        if let Some(port) = self.leaf_listen {
            let _ = writeln!(out, "leafnodes {{ listen: \"{host}:{port}\" }}");
        }
        if let Some(account) = &self.account {
            render_account(&mut out, account);
        }
        if !self.leaf_remotes.is_empty() {
            let deny = if self.leaf_deny.is_empty() {
                String::new()
            } else {
                let list: Vec<String> = self.leaf_deny.iter().map(|s| format!("{s:?}")).collect();
                let list = list.join(", ");
                format!(", deny_imports: [{list}], deny_exports: [{list}]")
            };
            let remotes: Vec<String> = self
                .leaf_remotes
                .iter()
                .map(|p| format!("{{ url: \"nats-leaf://{host}:{p}\"{deny} }}"))
                .collect();
            let _ = writeln!(out, "leafnodes {{ remotes: [{}] }}", remotes.join(", "));
        }
        out
    }
}

/// Renders `accounts { <name> { jetstream: enabled, users: [...] } }`.
fn render_account(out: &mut String, account: &AccountSpec) {
    let list = |subjects: &[String]| {
        subjects
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(out, "accounts {{");
    let _ = writeln!(out, "  {:?} {{", account.name);
    let _ = writeln!(out, "    jetstream: enabled");
    let _ = writeln!(out, "    users: [");
    for user in &account.users {
        let mut permissions = Vec::new();
        if !user.publish.is_empty() {
            permissions.push(format!("publish: {{ allow: [{}] }}", list(&user.publish)));
        }
        if !user.subscribe.is_empty() {
            permissions.push(format!(
                "subscribe: {{ allow: [{}] }}",
                list(&user.subscribe)
            ));
        }
        if user.allow_responses {
            permissions.push("allow_responses: true".into());
        }
        let _ = writeln!(
            out,
            "      {{ user: {:?}, password: {:?}, permissions: {{ {} }} }}",
            user.user,
            user.password,
            permissions.join(", ")
        );
    }
    let _ = writeln!(out, "    ]");
    let _ = writeln!(out, "  }}");
    let _ = writeln!(out, "}}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cluster_and_leaf_sections() {
        let mut spec = ServerSpec::single("n1", "127.0.0.1", 4222, 8222, PathBuf::from("/tmp/x"));
        spec.cluster = Some(ClusterSpec {
            name: "c".into(),
            port: 6222,
            routes: vec![6222, 6223],
        });
        spec.leaf_remotes = vec![7422];
        spec.domain = Some("region-a".into());
        let text = spec.config_text();
        assert!(text.contains("listen: \"127.0.0.1:4222\""));
        assert!(text.contains("nats-route://127.0.0.1:6223"));
        assert!(text.contains("nats-leaf://127.0.0.1:7422"));
        assert!(text.contains("domain: region-a"));
    }

    #[test]
    fn renders_an_account_with_users_and_permissions() {
        let mut spec = ServerSpec::single("n1", "127.0.0.1", 4222, 8222, PathBuf::from("/tmp/x"));
        spec.account = Some(AccountSpec {
            name: "TETHER".into(),
            users: vec![UserSpec {
                user: "biz-chat".into(),
                password: "pw".into(),
                publish: vec!["a.>".into()],
                subscribe: vec!["a.>".into(), "_INBOX.biz-chat.>".into()],
                allow_responses: true,
            }],
        });
        let text = spec.config_text();
        assert!(text.contains("jetstream: enabled"), "{text}");
        assert!(
            text.contains(
                "{ user: \"biz-chat\", password: \"pw\", permissions: { publish: { allow: [\"a.>\"] }, \
                 subscribe: { allow: [\"a.>\", \"_INBOX.biz-chat.>\"] }, allow_responses: true } }"
            ),
            "{text}"
        );
    }
}
