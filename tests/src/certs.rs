//! Certificates the tests need beyond what `shardctl dev certs` makes: the folders it writes,
//! and, signed with its CA's key, a node certificate that has expired and a revocation list.

use crate::run_shardctl;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SerialNumber};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `shardctl dev certs --out DIR` for localhost and 127.0.0.1: ca.pem, ca.key, server.*,
/// client.*, node.*.
pub fn dev_certs(dir: &Path) {
    let out =
        run_shardctl(&["dev", "certs", "--out", dir.to_str().unwrap(), "--hosts", "localhost,127.0.0.1"], &[], Duration::from_secs(60));
    assert!(out.status.success(), "shardctl dev certs: {}", out.stderr);
}

/// The CA of a `dev certs` folder, able to sign (its name as `dev certs` writes it).
fn issuer(dir: &Path) -> Issuer<'static, KeyPair> {
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "shardserve cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    Issuer::new(ca, key)
}

/// A node certificate of `dir`'s CA (server and client auth, for 127.0.0.1) with `serial`,
/// valid from `from` to `to` days relative to now; written as `NAME.pem` and `NAME.key` in
/// `dir`, whose paths are returned.
pub fn node_cert(dir: &Path, name: &str, serial: u64, from: i64, to: i64) -> (PathBuf, PathBuf) {
    let now = time::OffsetDateTime::now_utc();
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.serial_number = Some(SerialNumber::from(serial));
    p.not_before = now + time::Duration::days(from);
    p.not_after = now + time::Duration::days(to);
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, &issuer(dir)).unwrap();
    let (c, k) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A CRL of `dir`'s CA revoking the certificates with `serials`, written as `crl.pem`.
pub fn crl(dir: &Path, serials: &[u64]) -> PathBuf {
    let now = time::OffsetDateTime::now_utc();
    let params = rcgen::CertificateRevocationListParams {
        this_update: now - time::Duration::minutes(5),
        next_update: now + time::Duration::days(1),
        crl_number: SerialNumber::from(1u64),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|&s| rcgen::RevokedCertParams {
                serial_number: SerialNumber::from(s),
                revocation_time: now - time::Duration::minutes(1),
                reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&issuer(dir)).unwrap();
    let path = dir.join("crl.pem");
    std::fs::write(&path, crl.pem().unwrap()).unwrap();
    path
}
