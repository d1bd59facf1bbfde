//! A PostgreSQL server that accepts only TLS, with a certificate authority
//! and a server certificate made by the test, for the tests of `sslmode`.
//! One per test process, started on first use from the machine's PostgreSQL
//! binaries (as the `postgres` user when the tests run as root); it stops
//! when the test process exits, because its keeper waits on a pipe that the
//! process holds open.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::sync::OnceCell;

/// The running server and what a test needs to reach it.
pub struct TlsServer {
    pub port: u16,
    /// PEM of the authority that signed the server's certificate.
    pub ca_file: PathBuf,
    /// PEM of an authority that signed nothing the server has.
    pub other_ca_file: PathBuf,
    /// Host names on the server's certificate.
    pub names: Vec<String>,
    _keeper: std::sync::Mutex<Child>,
}

impl TlsServer {
    /// The server of this test process, started on first use.
    pub async fn get() -> &'static TlsServer {
        static SERVER: OnceCell<TlsServer> = OnceCell::const_new();
        SERVER
            .get_or_init(|| async {
                tokio::task::spawn_blocking(start)
                    .await
                    .expect("start the TLS server")
            })
            .await
    }

    /// A URL of this server's database `db` reached at `host`, with `query`
    /// (e.g. `sslmode=verify-full`).
    pub fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!(
            "postgres://postgres@{host}:{}/{db}{}{query}",
            self.port,
            if query.is_empty() { "" } else { "?" }
        )
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` with `args`, as the `postgres` user when we are root (the
/// server refuses to run as root).
fn as_server_user(program: &Path, root: bool) -> Command {
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn bindir() -> PathBuf {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("pg_config (PostgreSQL's binaries) is needed for the TLS tests");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    if dir.join("initdb").exists() {
        return dir;
    }
    // Debian keeps the server binaries per major version.
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("no initdb found (pg_config --bindir, /usr/lib/postgresql/*/bin)")
}

/// A CA, a server certificate it signs for `names`, and a second CA.
fn certificates(dir: &Path, names: &[String]) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.self_signed(&key).unwrap();
        (cert.pem(), Issuer::new(p, key))
    };
    let (ca_pem, issuer) = ca("Offload test CA");
    let (other_pem, _) = ca("Offload test CA nobody trusts");
    let mut p = CertificateParams::new(names.to_vec()).unwrap();
    p.distinguished_name
        .push(DnType::CommonName, names[0].as_str());
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    (
        write("ca.pem", &ca_pem),
        write("other-ca.pem", &other_pem),
        write("server.crt", &cert.pem()),
        write("server.key", &key.serialize_pem()),
    )
}

fn start() -> TlsServer {
    let root = is_root();
    let bin = bindir();
    let dir = std::env::temp_dir().join(format!("offload-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let (ca_file, other_ca_file, crt, key) = certificates(&dir, &names);
    let data = dir.join("data");
    if root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir));
    }
    run(as_server_user(&bin.join("initdb"), root)
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data));
    // Only TLS over TCP, from any loopback address; the socket directory is
    // the test's own.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.0/8 trust\nhostssl all all ::1/128 trust\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(&key).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
    std::fs::set_permissions(&key, perms).unwrap();
    if root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir));
    }
    let port = super::free_port();
    let postgres = bin.join("postgres");
    let server = format!(
        "exec {} -D {} -p {port} -k {} -c listen_addresses=127.0.0.1,127.0.0.2 \
         -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c fsync=off \
         -c max_connections=200 -c shared_buffers=32MB",
        postgres.display(),
        data.display(),
        dir.display(),
        crt.display(),
        key.display()
    );
    // The keeper starts the server, then waits for its stdin to close (the
    // test process exiting) and stops it, fast.
    let script = format!(
        "{server} >{log} 2>&1 & pid=$!; cat >/dev/null; kill -INT $pid; wait $pid; \
         rm -rf {dir}",
        log = dir.join("server.log").display(),
        dir = dir.display()
    );
    let mut keeper = as_server_user(Path::new("/bin/sh"), root)
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start the TLS server");
    // The pipe stays open for the life of the process: the keeper owns the
    // read end, this process the write end (leaked on purpose).
    std::mem::forget(keeper.stdin.take());
    let ready = bin.join("pg_isready");
    let end = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(&ready)
            .args(["-q", "-h"])
            .arg(&dir)
            .args(["-p", &port.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok {
            break;
        }
        if std::time::Instant::now() > end {
            let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
            panic!("the TLS server did not start:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    TlsServer {
        port,
        ca_file,
        other_ca_file,
        names,
        _keeper: std::sync::Mutex::new(keeper),
    }
}
