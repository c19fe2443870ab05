//! The cluster's trust read again while running: a CRL rewritten, a CA rotation caught
//! half-written.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, RevokedCertParams, SerialNumber,
};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    dir: tempfile::TempDir,
}

impl Ca {
    fn new() -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, "test CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = p.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Ca { issuer: Issuer::new(p, key), dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A node certificate with `serial`, as `NAME.pem` and `NAME.key`.
    fn node(&self, name: &str, serial: u64) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec!["node".to_string()]).unwrap();
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(SerialNumber::from(serial));
        std::fs::write(self.path(&format!("{name}.pem")), p.signed_by(&key, &self.issuer).unwrap().pem()).unwrap();
        std::fs::write(self.path(&format!("{name}.key")), key.serialize_pem()).unwrap();
    }

    /// `crl.pem` revoking `serials`, numbered `number` (a new list must differ from the old).
    fn crl(&self, number: u64, serials: &[u64]) {
        let now = time::OffsetDateTime::now_utc();
        let revoked = serials
            .iter()
            .map(|&s| RevokedCertParams {
                serial_number: SerialNumber::from(s),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            })
            .collect();
        let p = CertificateRevocationListParams {
            this_update: now - time::Duration::minutes(1),
            next_update: now + time::Duration::days(1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        std::fs::write(self.path("crl.pem"), p.signed_by(&self.issuer).unwrap().pem().unwrap()).unwrap();
    }

    fn identity(&self, name: &str) -> Arc<ClusterTls> {
        ClusterTls::open(
            &self.path("ca.pem"),
            &self.path(&format!("{name}.pem")),
            &self.path(&format!("{name}.key")),
            Some(&self.path("crl.pem")),
        )
        .unwrap()
    }
}

/// One blocking handshake of `client` to `server`: the server's verdict.
fn handshake(server: &ClusterTls, client: Arc<ClusterTls>) -> Result<(), String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = client.connect_blocking(tcp, "127.0.0.1").map(|mut s| std::io::Write::flush(&mut s));
    });
    let (tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let verdict = server.accept_blocking(tcp).map(|_| ()).map_err(|e| e.to_string());
    t.join().unwrap();
    verdict
}

#[test]
fn a_certificate_revoked_while_running_is_refused_from_the_next_handshake_on() {
    let ca = Ca::new();
    ca.node("server", 1);
    ca.node("member", 2);
    ca.crl(1, &[]);
    let server = ca.identity("server");
    handshake(&server, ca.identity("member")).expect("a member is let in");
    // The CRL file is rewritten: no restart, no new ClusterTls.
    ca.crl(2, &[2]);
    let err = handshake(&server, ca.identity("member")).unwrap_err();
    assert!(err.contains("Revoked"), "{err}");
}

#[test]
fn a_ca_file_that_does_not_load_is_named_and_a_broken_rotation_keeps_the_previous_one() {
    let ca = Ca::new();
    ca.node("server", 1);
    ca.node("member", 2);
    ca.crl(1, &[]);
    let err = ClusterTls::open(&ca.path("missing.pem"), &ca.path("server.pem"), &ca.path("server.key"), None).unwrap_err().to_string();
    assert!(err.starts_with("--cluster-ca ") && err.contains("missing.pem"), "{err}");
    let (server, member) = (ca.identity("server"), ca.identity("member"));
    // A half-written CA file: both ends keep the trust they had, and the member gets in.
    std::fs::write(ca.path("ca.pem"), "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    handshake(&server, member).expect("the previous CA is still trusted");
}
