//! TLS to PostgreSQL, as libpq reads `sslmode` and `sslrootcert` from the
//! connection URL, over rustls (no OpenSSL, so the Lambda build stays one
//! static binary).
//!
//! | `sslmode` | encrypted | certificate checked |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` | if the server offers it | no |
//! | `require` | always | no; with a CA file (`sslrootcert`), its chain, as libpq does |
//! | `verify-ca` | always | chain, against the platform's roots and the CA file |
//! | `verify-full` | always | chain and host name |
//!
//! Without `sslmode`, a loopback host or a Unix socket gets `disable` and
//! any other host `require`: nothing crosses a network in clear text unless
//! the URL says so.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres::config::{Host, SslMode as PgSslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

/// `sslmode` of a connection URL.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "prefer" | "allow" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                ))
            }
        })
    }
}

impl SslMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// A parsed connection URL: what tokio-postgres connects to, and how.
#[derive(Clone)]
pub struct Target {
    pub config: tokio_postgres::Config,
    pub mode: SslMode,
    pub ca_file: Option<PathBuf>,
    pub tls: MakeRustlsConnect,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("mode", &self.mode)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// Splits `sslmode` and `sslrootcert` off a URL's query (tokio-postgres
/// knows neither `verify-ca` nor `verify-full`, nor `sslrootcert`), and
/// returns the rest of the URL with them.
fn split_tls_params(url: &str) -> Result<(String, Option<SslMode>, Option<PathBuf>), String> {
    let Some((base, query)) = url.split_once('?') else {
        return Ok((url.to_string(), None, None));
    };
    let (mut mode, mut ca, mut rest) = (None, None, Vec::new());
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "sslmode" => mode = Some(v.parse::<SslMode>()?),
            "sslrootcert" => ca = Some(PathBuf::from(&*v)),
            _ => rest.push((k.into_owned(), v.into_owned())),
        }
    }
    let url = if rest.is_empty() {
        base.to_string()
    } else {
        let q = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(rest)
            .finish();
        format!("{base}?{q}")
    };
    Ok((url, mode, ca))
}

fn is_loopback(config: &tokio_postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name == "localhost"
                || name
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse::<IpAddr>()
                    .map(|ip| ip.is_loopback())
                    .unwrap_or(false)
        }
    })
}

/// Parses a `postgres://` URL with its TLS settings (`ca_file`, when given,
/// is used unless the URL names its own `sslrootcert`).
pub fn target(url: &str, ca_file: Option<&Path>) -> Result<Target, String> {
    let (rest, mode, url_ca) = split_tls_params(url)?;
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| e.to_string())?;
    let mode = mode.unwrap_or(if is_loopback(&config) {
        SslMode::Disable
    } else {
        SslMode::Require
    });
    config.ssl_mode(match mode {
        SslMode::Disable => PgSslMode::Disable,
        SslMode::Prefer => PgSslMode::Prefer,
        _ => PgSslMode::Require,
    });
    let ca_file = url_ca.or_else(|| ca_file.map(Path::to_path_buf));
    let tls = MakeRustlsConnect::new(client_config(mode, ca_file.as_deref())?);
    Ok(Target {
        config,
        mode,
        ca_file,
        tls,
    })
}

fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// The platform's root certificates, read once per process (a few
/// milliseconds), and only by a mode that checks certificates.
fn platform_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "skipped a platform root certificate");
        }
        found.certs
    })
}

/// The certificates of a PEM file, or why there are none.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "the CA file {} holds no PEM certificate",
            path.display()
        ));
    }
    Ok(certs)
}

fn client_config(mode: SslMode, ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let extra = ca_file.map(read_ca_file).transpose()?;
    // libpq: `require` with a root certificate file checks the chain.
    let check = match (mode, &extra) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => None,
        (SslMode::Require | SslMode::VerifyCa, _) => Some(false),
        (SslMode::VerifyFull, _) => Some(true),
    };
    let Some(check_name) = check else {
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(EncryptOnly(provider())))
            .with_no_client_auth());
    };
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(platform_roots().iter().cloned());
    for cert in extra.into_iter().flatten() {
        roots
            .add(cert)
            .map_err(|e| format!("a certificate of the CA file is not usable: {e}"))?;
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|e| format!("no usable root certificate: {e}"))?;
    let verifier: Arc<dyn ServerCertVerifier> = if check_name {
        webpki
    } else {
        Arc::new(ChainOnly(webpki))
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// `prefer` and `require` without a CA: the session is encrypted and the
/// handshake's signatures are checked, the certificate is not (libpq's
/// meaning of those modes).
#[derive(Debug)]
struct EncryptOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain must lead to a trusted root; the name on the
/// certificate is not compared with the host.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A sentence naming the likely cause of a failed connection, from the
/// error's whole chain of causes and the mode that was asked for; `None`
/// when the error says it well enough.
pub fn explain(chain: &str, mode: SslMode, host: &str) -> Option<String> {
    let has = |needle: &str| chain.contains(needle);
    if has("UnknownIssuer") {
        Some(format!(
            "the server's certificate is not signed by a trusted authority (sslmode={}): \
             set OFFLOAD_DB_CA_FILE (or sslrootcert in the URL) to your provider's CA bundle, \
             e.g. the RDS global bundle",
            mode.as_str()
        ))
    } else if has("NotValidForName") || has("not valid for name") {
        Some(format!(
            "the server's certificate does not name the host {host:?}, which sslmode=verify-full \
             checks: connect by a name the certificate holds, or use sslmode=verify-ca"
        ))
    } else if has("Expired") {
        Some("the server's certificate has expired".into())
    } else if has("server does not support TLS") {
        Some(format!(
            "the server does not offer TLS, and sslmode={} requires it",
            mode.as_str()
        ))
    } else if has("no encryption") {
        Some(
            "the server accepts only encrypted connections and sslmode is disable (the \
             default for a loopback host): set sslmode=require or stricter in DATABASE_URL"
                .into(),
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(url: &str) -> SslMode {
        target(url, None).unwrap().mode
    }

    #[test]
    fn a_remote_host_without_sslmode_gets_require_and_loopback_disable() {
        assert_eq!(mode_of("postgres://u:p@db.example.com/x"), SslMode::Require);
        assert_eq!(mode_of("postgres://u:p@10.0.0.5:5432/x"), SslMode::Require);
        assert_eq!(mode_of("postgres://u:p@127.0.0.1/x"), SslMode::Disable);
        assert_eq!(mode_of("postgres://u:p@localhost/x"), SslMode::Disable);
        assert_eq!(mode_of("postgres://u:p@[::1]:5432/x"), SslMode::Disable);
        assert_eq!(
            mode_of("postgres://u:p@127.0.0.1/x?sslmode=verify-full"),
            SslMode::VerifyFull
        );
        assert_eq!(
            mode_of("postgres://u:p@db.example.com/x?sslmode=disable"),
            SslMode::Disable
        );
    }

    #[test]
    fn tls_parameters_leave_the_url_and_the_others_stay() {
        let (rest, mode, ca) = split_tls_params(
            "postgres://u:p@h/x?application_name=a&sslmode=verify-ca&sslrootcert=%2Ftmp%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h/x?application_name=a");
        assert_eq!(mode, Some(SslMode::VerifyCa));
        assert_eq!(ca, Some(PathBuf::from("/tmp/ca.pem")));
    }

    #[test]
    fn a_bad_sslmode_or_ca_file_is_named() {
        let e = target("postgres://u:p@h/x?sslmode=verify", None).unwrap_err();
        assert!(e.contains("sslmode=verify is not one of"), "{e}");
        let e = target(
            "postgres://u:p@h/x?sslmode=verify-full",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .unwrap_err();
        assert!(
            e.contains("cannot read the CA file /nonexistent/ca.pem"),
            "{e}"
        );
    }
}
