//! TLS targets for the tests: `openssl s_server` with a self-signed certificate of its own
//! (used by the server-name routing tests and the tls health checks).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::{wait_for, WAIT};

/// A self-signed certificate for `name` (CN and subjectAltName), as files in `dir`.
pub fn cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj"])
        .arg(format!("/CN={name}"))
        .arg("-addext")
        .arg(format!("subjectAltName=DNS:{name}"))
        .arg("-keyout")
        .arg(&k)
        .arg("-out")
        .arg(&c)
        .output()
        .expect("openssl is needed for the TLS tests (make deps installs it)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (c, k)
}

/// `openssl s_server -www` on 127.0.0.1:`port` with a certificate for `name`; killed on drop.
pub struct TlsTarget {
    child: Child,
    pub port: u16,
    pub cert: PathBuf,
}

impl TlsTarget {
    pub fn start(dir: &Path, name: &str, port: u16) -> TlsTarget {
        let (c, k) = cert(dir, name);
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&c)
            .arg("-key")
            .arg(&k)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_server");
        wait_for(&format!("s_server for {name} on {port}"), WAIT, || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        TlsTarget {
            child,
            port,
            cert: c,
        }
    }

    pub fn target(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
