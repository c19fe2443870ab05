//! A tensor-parallel group over TCP, in a star around the leader (rank 0).
//!
//! Every follower has one connection to the leader. On it the leader sends control messages
//! (the steps and releases its followers must mirror) and both sides exchange all-reduce data:
//! each follower sends its partial tensor, the leader adds them in rank order and sends the sum
//! back, so every rank ends with the same bits. Frames are `[kind: u8][len: u64 LE][payload]`.
//! Only one thread per process drives a group (the worker's compute thread), so the order of
//! frames on a link is the order of operations on both ends.
//!
//! With the cluster's certificates (`--cluster-ca`) every link is mutual TLS: the leader's
//! listener and the followers both present a certificate of the cluster CA, and a peer without
//! one is refused before its hello is read.
//!
//! A link that closes, errs, or stays silent past the group's timeout breaks the group: every
//! connection is shut down (so ranks blocked on it wake up and fail too) and every later call
//! fails at once with the first reason.

use super::Collective;
use candle_core::{DType, Device, Tensor};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

/// Frame kinds.
mod kind {
    pub const HELLO: u8 = 1;
    pub const ACK: u8 = 2;
    pub const CONTROL: u8 = 3;
    pub const REDUCE: u8 = 4;
}

/// Longest frame accepted: a prefill's hidden states at the largest chunk fit well below it.
const MAX_FRAME: u64 = 1 << 31;

/// A byte stream a link runs over: the socket itself, or TLS over it.
pub trait Transport: Read + Write + Send {}
impl<T: Read + Write + Send> Transport for T {}

/// One end of a link: its byte stream, and the socket under it (for timeouts and shutdown,
/// which TLS leaves to the socket).
pub struct Link {
    io: Box<dyn Transport>,
    socket: TcpStream,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({:?})", self.socket.peer_addr().ok())
    }
}

impl Link {
    /// A plaintext link.
    pub fn plain(s: TcpStream) -> std::io::Result<Self> {
        Ok(Link { socket: s.try_clone()?, io: Box::new(s) })
    }

    /// A link over `io`, a stream (TLS) over `socket`.
    pub fn over(io: impl Transport + 'static, socket: &TcpStream) -> std::io::Result<Self> {
        Ok(Link { socket: socket.try_clone()?, io: Box::new(io) })
    }

    /// The server side of a link accepted on `tcp`: TLS when `tls` is given (bounded by the
    /// socket's timeouts).
    pub fn accept(tcp: TcpStream, tls: Option<&crate::tls::ClusterTls>) -> std::io::Result<Self> {
        match tls {
            Some(t) => {
                let socket = tcp.try_clone()?;
                Link::over(t.accept_blocking(tcp)?, &socket)
            }
            None => Link::plain(tcp),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.io.read(buf)
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.io.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.io.flush()
    }
}

fn write_frame(s: &mut impl Write, k: u8, payload: &[u8]) -> std::io::Result<()> {
    let mut head = [0u8; 9];
    head[0] = k;
    head[1..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    if payload.len() <= 64 * 1024 {
        let mut buf = Vec::with_capacity(9 + payload.len());
        buf.extend_from_slice(&head);
        buf.extend_from_slice(payload);
        s.write_all(&buf)?;
    } else {
        s.write_all(&head)?;
        s.write_all(payload)?;
    }
    // TLS buffers what it writes until flushed; a plain socket has nothing to flush.
    s.flush()
}

fn read_frame(s: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head)?;
    let len = u64::from_le_bytes(head[1..].try_into().expect("8 bytes"));
    if len > MAX_FRAME {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("a frame of {len} bytes is larger than the limit")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn describe(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof => "connection closed".into(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => "timed out".into(),
        _ => e.to_string(),
    }
}

/// The opening message of a follower's connection: which group and rank it is.
pub fn hello(stream: &mut impl Write, group: &str, rank: usize) -> std::io::Result<()> {
    let mut payload = (rank as u32).to_le_bytes().to_vec();
    payload.extend_from_slice(group.as_bytes());
    write_frame(stream, kind::HELLO, &payload)
}

/// Reads a follower's hello: (group, rank).
pub fn read_hello(stream: &mut impl Read) -> std::io::Result<(String, usize)> {
    let (k, p) = read_frame(stream)?;
    if k != kind::HELLO || p.len() < 4 {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "not a tensor-parallel hello"));
    }
    let rank = u32::from_le_bytes(p[..4].try_into().expect("4 bytes")) as usize;
    let group = String::from_utf8_lossy(&p[4..]).into_owned();
    Ok((group, rank))
}

/// A tensor-parallel group's links, seen from one rank.
pub struct TcpGroup {
    rank: usize,
    size: usize,
    /// Leader: one link per follower, rank 1 first. Follower: the link to the leader.
    links: Vec<Mutex<Link>>,
    /// Names of the ranks (worker ids), by rank, for messages.
    names: Vec<String>,
    /// Clones of the links' sockets, to shut them down while another thread blocks on one.
    shutters: Vec<TcpStream>,
    timeout: Duration,
    broken: Mutex<Option<String>>,
}

impl std::fmt::Debug for TcpGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpGroup").field("rank", &self.rank).field("size", &self.size).field("names", &self.names).finish_non_exhaustive()
    }
}

impl TcpGroup {
    /// The leader's side: `followers` are the connections of ranks 1.. in order, each past its
    /// hello; they are acknowledged here, which completes the group on their side.
    pub fn leader(followers: Vec<Link>, names: Vec<String>, timeout: Duration) -> std::io::Result<Self> {
        let size = followers.len() + 1;
        let (mut links, mut shutters) = (Vec::with_capacity(followers.len()), Vec::new());
        for mut s in followers {
            s.socket.set_nodelay(true)?;
            s.socket.set_read_timeout(Some(timeout))?;
            s.socket.set_write_timeout(Some(timeout))?;
            write_frame(&mut s, kind::ACK, &[])?;
            shutters.push(s.socket.try_clone()?);
            links.push(Mutex::new(s));
        }
        Ok(TcpGroup { rank: 0, size, links, names: padded(names, size), shutters, timeout, broken: Mutex::new(None) })
    }

    /// A follower's side: connects to the leader at `leader` (over mutual TLS when `tls` is
    /// given), says which rank it is and waits (up to `wait`) until the leader has every rank.
    #[allow(clippy::too_many_arguments)]
    pub fn follower(
        leader: &str,
        tls: Option<&crate::tls::ClusterTls>,
        group: &str,
        rank: usize,
        size: usize,
        names: Vec<String>,
        timeout: Duration,
        wait: Duration,
    ) -> std::io::Result<Self> {
        let addr = std::net::ToSocketAddrs::to_socket_addrs(leader)?
            .next()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, format!("{leader} resolves to nothing")))?;
        let tcp = TcpStream::connect_timeout(&addr, timeout)?;
        tcp.set_nodelay(true)?;
        tcp.set_write_timeout(Some(timeout))?;
        tcp.set_read_timeout(Some(timeout))?;
        let mut s = match tls {
            Some(t) => {
                let host = leader.rsplit_once(':').map_or(leader, |(h, _)| h);
                Link::over(t.connect_blocking(tcp.try_clone()?, host)?, &tcp)?
            }
            None => Link::plain(tcp)?,
        };
        hello(&mut s, group, rank)?;
        s.socket.set_read_timeout(Some(wait))?;
        let (k, _) = read_frame(&mut s)?;
        if k != kind::ACK {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "the leader did not acknowledge"));
        }
        s.socket.set_read_timeout(Some(timeout))?;
        Ok(TcpGroup {
            rank,
            size,
            shutters: vec![s.socket.try_clone()?],
            links: vec![Mutex::new(s)],
            names: padded(names, size),
            timeout,
            broken: Mutex::new(None),
        })
    }

    /// The name of `rank` for messages.
    pub fn name(&self, rank: usize) -> String {
        format!("tensor-parallel rank {rank} (worker {})", self.names[rank])
    }

    /// Why the group is broken, if it is.
    pub fn broken(&self) -> Option<String> {
        self.broken.lock().expect("broken lock").clone()
    }

    /// Breaks the group: remembers the first reason and shuts every link down, so ranks
    /// blocked on one wake up.
    pub fn fail(&self, why: String) -> String {
        let first = {
            let mut b = self.broken.lock().expect("broken lock");
            b.get_or_insert(why).clone()
        };
        for s in &self.shutters {
            let _ = s.shutdown(Shutdown::Both);
        }
        first
    }

    /// Leader: watches every follower's link on threads of its own and calls `lost` with the
    /// reason when one closes or fails (the group is failed first). For groups whose data goes
    /// elsewhere (NCCL), where followers never write to these links, so anything read here is
    /// the end of the link.
    pub fn watch_followers(self: &std::sync::Arc<Self>, lost: impl Fn(String) + Send + Sync + 'static) {
        let lost = std::sync::Arc::new(lost);
        for (i, s) in self.shutters.iter().enumerate() {
            let Ok(s) = s.try_clone() else { continue };
            let (group, lost) = (std::sync::Arc::downgrade(self), lost.clone());
            let _ = std::thread::Builder::new().name("tp-watch".into()).spawn(move || {
                let mut byte = [0u8; 1];
                let _ = s.set_read_timeout(None);
                let why = match s.peek(&mut byte) {
                    Ok(_) => "connection closed".to_string(),
                    Err(e) => describe(&e),
                };
                if let Some(g) = group.upgrade() {
                    lost(g.fail(format!("{}: {why}", g.name(i + 1))));
                }
            });
        }
    }

    /// Closes the group without an error (a new shard replaces it).
    pub fn close(&self) {
        self.fail("the group was closed".into());
    }

    fn check(&self) -> Result<(), String> {
        match self.broken() {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }

    /// Leader: sends a control message to every follower.
    pub fn send_control(&self, payload: &[u8]) -> Result<(), String> {
        self.check()?;
        for (i, l) in self.links.iter().enumerate() {
            let mut s = l.lock().expect("link lock");
            if let Err(e) = write_frame(&mut *s, kind::CONTROL, payload) {
                drop(s);
                return Err(self.fail(format!("{}: {}", self.name(i + 1), describe(&e))));
            }
        }
        Ok(())
    }

    /// Follower: the next control message from the leader; `None` once the leader closed the
    /// group. Waits as long as it takes (an idle group is normal).
    pub fn recv_control(&self) -> Result<Option<Vec<u8>>, String> {
        self.check()?;
        let link = &self.links[0];
        // The blocking read holds the lock; `fail` shuts the socket down through its clone, so
        // it can still wake this reader.
        let mut s = link.lock().expect("link lock");
        let _ = s.socket.set_read_timeout(None);
        let got = read_frame(&mut *s);
        let _ = s.socket.set_read_timeout(Some(self.timeout));
        match got {
            Ok((kind::CONTROL, p)) => Ok(Some(p)),
            Ok((k, _)) => {
                drop(s);
                Err(self.fail(format!("{}: unexpected frame {k} while idle", self.name(0))))
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                drop(s);
                self.fail(format!("{} closed the group", self.name(0)));
                Ok(None)
            }
            Err(e) => {
                drop(s);
                Err(self.fail(format!("{}: {}", self.name(0), describe(&e))))
            }
        }
    }

    fn reduce(&self, t: &Tensor) -> Result<Tensor, String> {
        self.check()?;
        let (dtype, shape, device) = (t.dtype(), t.dims().to_vec(), t.device().clone());
        let mine: Vec<f32> =
            t.to_dtype(DType::F32).and_then(|x| x.flatten_all()).and_then(|x| x.to_vec1::<f32>()).map_err(|e| e.to_string())?;
        let n = mine.len();
        let sum: Vec<f32> = if self.rank == 0 {
            let mut acc = mine;
            for (i, l) in self.links.iter().enumerate() {
                let mut s = l.lock().expect("link lock");
                let got = read_frame(&mut *s);
                drop(s);
                let part = match got {
                    Ok((kind::REDUCE, p)) if p.len() == n * 4 => p,
                    Ok((k, p)) => {
                        return Err(self.fail(format!(
                            "{}: expected {} bytes of all-reduce data, got frame {k} of {} bytes",
                            self.name(i + 1),
                            n * 4,
                            p.len()
                        )))
                    }
                    Err(e) => return Err(self.fail(format!("{}: {}", self.name(i + 1), describe(&e)))),
                };
                for (a, c) in acc.iter_mut().zip(part.chunks_exact(4)) {
                    *a += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            let bytes: Vec<u8> = acc.iter().flat_map(|v| v.to_le_bytes()).collect();
            for (i, l) in self.links.iter().enumerate() {
                let mut s = l.lock().expect("link lock");
                if let Err(e) = write_frame(&mut *s, kind::REDUCE, &bytes) {
                    drop(s);
                    return Err(self.fail(format!("{}: {}", self.name(i + 1), describe(&e))));
                }
            }
            acc
        } else {
            let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut s = self.links[0].lock().expect("link lock");
            let got = write_frame(&mut *s, kind::REDUCE, &bytes).and_then(|()| read_frame(&mut *s));
            drop(s);
            match got {
                Ok((kind::REDUCE, p)) if p.len() == n * 4 => {
                    p.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                }
                Ok((k, p)) => {
                    return Err(self.fail(format!(
                        "{}: expected {} bytes of all-reduce data, got frame {k} of {} bytes",
                        self.name(0),
                        n * 4,
                        p.len()
                    )))
                }
                Err(e) => return Err(self.fail(format!("{}: {}", self.name(0), describe(&e)))),
            }
        };
        Tensor::from_vec(sum, shape, &Device::Cpu)
            .and_then(|x| x.to_device(&device))
            .and_then(|x| x.to_dtype(dtype))
            .map_err(|e| e.to_string())
    }
}

fn padded(mut names: Vec<String>, size: usize) -> Vec<String> {
    while names.len() < size {
        names.push(format!("#{}", names.len()));
    }
    names
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> candle_core::Result<Tensor> {
        self.reduce(t).map_err(candle_core::Error::Msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Forms a group of `size` ranks on loopback, one thread per follower.
    fn group(size: usize) -> (TcpGroup, Vec<std::thread::JoinHandle<TcpGroup>>) {
        group_over(size, None)
    }

    /// The same, over mutual TLS when `tls` is given (every rank with the same identity).
    fn group_over(size: usize, tls: Option<std::sync::Arc<crate::tls::ClusterTls>>) -> (TcpGroup, Vec<std::thread::JoinHandle<TcpGroup>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let names: Vec<String> = (0..size).map(|r| format!("w{r}")).collect();
        let threads: Vec<_> = (1..size)
            .map(|r| {
                let (addr, names, tls) = (addr.clone(), names.clone(), tls.clone());
                std::thread::spawn(move || {
                    TcpGroup::follower(&addr, tls.as_deref(), "g", r, size, names, Duration::from_secs(5), Duration::from_secs(5)).unwrap()
                })
            })
            .collect();
        let mut conns: Vec<(usize, Link)> = (1..size)
            .map(|_| {
                let (s, _) = listener.accept().unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut s = Link::accept(s, tls.as_deref()).unwrap();
                let (g, r) = read_hello(&mut s).unwrap();
                assert_eq!(g, "g");
                (r, s)
            })
            .collect();
        conns.sort_by_key(|(r, _)| *r);
        let leader = TcpGroup::leader(conns.into_iter().map(|(_, s)| s).collect(), names, Duration::from_secs(5)).unwrap();
        (leader, threads)
    }

    #[test]
    fn all_reduce_gives_every_rank_the_same_sum() {
        let (leader, threads) = group(3);
        let followers: Vec<TcpGroup> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let handles: Vec<_> = followers
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    let t = Tensor::new(&[[g.rank as f32, 1.0], [2.0, 3.0]], &Device::Cpu).unwrap();
                    g.all_reduce_sum(&t).unwrap().to_vec2::<f32>().unwrap()
                })
            })
            .collect();
        let t = Tensor::new(&[[0.5f32, 1.0], [2.0, 3.0]], &Device::Cpu).unwrap();
        let mine = leader.all_reduce_sum(&t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(mine, vec![vec![3.5, 3.0], vec![6.0, 9.0]]);
        for h in handles {
            assert_eq!(h.join().unwrap(), mine);
        }
    }

    #[test]
    fn control_messages_reach_followers_and_close_ends_them() {
        let (leader, threads) = group(2);
        let follower = threads.into_iter().next().unwrap().join().unwrap();
        leader.send_control(b"step 1").unwrap();
        assert_eq!(follower.recv_control().unwrap().as_deref(), Some(&b"step 1"[..]));
        drop(leader);
        assert_eq!(follower.recv_control().unwrap(), None);
        assert!(follower.broken().is_some());
    }

    #[test]
    fn a_vanished_rank_fails_the_reduce_and_names_it() {
        let (leader, threads) = group(2);
        let follower = threads.into_iter().next().unwrap().join().unwrap();
        drop(follower);
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        let err = leader.all_reduce_sum(&t).unwrap_err().to_string();
        assert!(err.contains("rank 1 (worker w1)") && err.contains("closed"), "{err}");
        // Broken for good: the next call fails at once with the same reason.
        let again = leader.all_reduce_sum(&t).unwrap_err().to_string();
        assert_eq!(err, again);
    }

    #[test]
    fn watching_followers_reports_a_closed_link_at_once() {
        let (leader, threads) = group(3);
        let mut followers: Vec<TcpGroup> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let leader = std::sync::Arc::new(leader);
        let (tx, rx) = std::sync::mpsc::channel();
        leader.watch_followers(move |why| {
            let _ = tx.send(why);
        });
        // Rank 2 goes away; rank 1 stays.
        drop(followers.pop());
        let why = rx.recv_timeout(Duration::from_secs(3)).expect("no report within 3 s");
        assert!(why.contains("rank 2 (worker w2)"), "{why}");
        assert_eq!(leader.broken().as_deref(), Some(why.as_str()));
    }

    #[test]
    fn a_silent_rank_times_out_instead_of_hanging() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || {
            TcpGroup::follower(&addr, None, "g", 1, 2, vec![], Duration::from_millis(300), Duration::from_secs(5)).unwrap()
        });
        let (s, _) = listener.accept().unwrap();
        let mut s = Link::plain(s).unwrap();
        read_hello(&mut s).unwrap();
        let leader = TcpGroup::leader(vec![s], vec!["a".into(), "b".into()], Duration::from_millis(300)).unwrap();
        let _follower = t.join().unwrap();
        let started = std::time::Instant::now();
        let err = leader.all_reduce_sum(&Tensor::new(&[1f32], &Device::Cpu).unwrap()).unwrap_err().to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    /// A CA and a certificate it signed for both ends of a link, written to `dir`.
    fn cluster_identity(dir: &std::path::Path, name: &str) -> std::sync::Arc<crate::tls::ClusterTls> {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["node".to_string()]).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let p = |f: &str| dir.join(format!("{name}-{f}"));
        std::fs::write(p("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(p("node.pem"), cert.pem()).unwrap();
        std::fs::write(p("node.key"), key.serialize_pem()).unwrap();
        crate::tls::ClusterTls::open(&p("ca.pem"), &p("node.pem"), &p("node.key"), None).unwrap()
    }

    #[test]
    fn a_group_over_mutual_tls_sums_as_over_plain_tcp() {
        let dir = tempfile::tempdir().unwrap();
        let (leader, threads) = group_over(3, Some(cluster_identity(dir.path(), "a")));
        let followers: Vec<TcpGroup> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let handles: Vec<_> = followers
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || {
                    g.all_reduce_sum(&Tensor::new(&[g.rank as f32], &Device::Cpu).unwrap()).unwrap().to_vec1::<f32>().unwrap()
                })
            })
            .collect();
        let mine = leader.all_reduce_sum(&Tensor::new(&[0.5f32], &Device::Cpu).unwrap()).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(mine, vec![3.5]);
        for h in handles {
            assert_eq!(h.join().unwrap(), mine);
        }
    }

    #[test]
    fn a_peer_of_another_cluster_or_in_plaintext_is_refused_before_its_hello() {
        let dir = tempfile::tempdir().unwrap();
        let ours = cluster_identity(dir.path(), "ours");
        cluster_identity(dir.path(), "theirs");
        // Trusts our CA, presents a certificate of another.
        let p = |f: &str| dir.path().join(f);
        let theirs = crate::tls::ClusterTls::open(&p("ours-ca.pem"), &p("theirs-node.pem"), &p("theirs-node.key"), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        for peer in [Some(theirs), None] {
            let (a, tls) = (addr.clone(), peer.clone());
            let t = std::thread::spawn(move || {
                TcpGroup::follower(&a, tls.as_deref(), "g", 1, 2, vec![], Duration::from_secs(2), Duration::from_secs(2)).map(|_| ())
            });
            let (s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let err = Link::accept(s, Some(&ours)).map(|_| ()).unwrap_err().to_string();
            // Both CAs have the same (empty) name: the signature is what does not match.
            // A follower without the cluster's certificates speaks plaintext, not TLS.
            let expected = if peer.is_some() { "invalid peer certificate: BadSignature" } else { "corrupt message" };
            assert!(err.contains(expected), "{err}");
            assert!(t.join().unwrap().is_err(), "the follower must not think it joined");
        }
    }
}
