//! TLS for the client listeners (rustls with the ring provider).

use std::fs::File;
use std::io::BufReader;
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, ServerConfig};

use crate::config::TlsFiles;
use crate::server::GatewayError;

/// Builds an acceptor from the PEM certificate chain and key of `files`.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, GatewayError> {
    let open = |path: &std::path::Path| {
        File::open(path)
            .map(BufReader::new)
            .map_err(|e| GatewayError::Tls(format!("{}: {e}", path.display())))
    };
    let certs = rustls_pemfile::certs(&mut open(&files.cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.cert.display())))?;
    if certs.is_empty() {
        return Err(GatewayError::Tls(format!(
            "{}: no certificate found",
            files.cert.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut open(&files.key)?)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", files.key.display())))?
        .ok_or_else(|| {
            GatewayError::Tls(format!("{}: no private key found", files.key.display()))
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
