//! Tiny backends that answer with their own name, and clients that ask them, each bound to
//! a namespace. Every wait is bounded.
//!
//! Protocol: the client sends a line; the server answers `<name> <client ip:port>\n`.

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::{NetNs, Topology};

/// Default I/O timeout of test clients.
pub const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// A running name server; stops (closing its listener and connections) on drop.
pub struct NameServer {
    pub name: String,
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    /// Requests answered.
    pub served: Arc<AtomicU64>,
}

impl NameServer {
    /// A TCP name server on `addr` in `ns` (`[::]:port` serves both families).
    pub fn tcp(ns: &NetNs, addr: impl Into<SocketAddr>, name: &str) -> io::Result<Self> {
        let addr = addr.into();
        let listener = ns.run(|| {
            let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            s.set_reuse_address(true)?;
            if addr.is_ipv6() {
                s.set_only_v6(false)?;
            }
            s.bind(&addr.into())?;
            s.listen(1024)?;
            io::Result::Ok(TcpListener::from(s))
        })?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let served = Arc::new(AtomicU64::new(0));
        let (st, cs, sv, nm) = (stop.clone(), conns.clone(), served.clone(), name.to_owned());
        let t = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((c, peer)) => {
                        c.set_nonblocking(false).ok();
                        if let Ok(c2) = c.try_clone() {
                            cs.lock().unwrap().push(c2);
                        }
                        let (nm, sv) = (nm.clone(), sv.clone());
                        std::thread::spawn(move || serve_tcp(c, peer, &nm, &sv));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self {
            name: name.into(),
            addr,
            stop,
            threads: vec![t],
            conns,
            served,
        })
    }

    /// A UDP name server on `addr` in `ns` (`[::]:port` serves both families). It answers
    /// its name and the asker's address; a query `big N` gets that padded to N bytes.
    pub fn udp(ns: &NetNs, addr: impl Into<SocketAddr>, name: &str) -> io::Result<Self> {
        let addr = addr.into();
        let sock = ns.run(|| {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            if addr.is_ipv6() {
                s.set_only_v6(false)?;
            }
            s.bind(&addr.into())?;
            io::Result::Ok(UdpSocket::from(s))
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let (st, sv, nm) = (stop.clone(), served.clone(), name.to_owned());
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let mut reply = format!("{nm} {peer}\n").into_bytes();
                    // "big N": an answer of N bytes (padded), larger than a link's MTU.
                    if let Some(size) = std::str::from_utf8(&buf[..n])
                        .ok()
                        .and_then(|q| q.strip_prefix("big "))
                        .and_then(|q| q.trim().parse::<usize>().ok())
                    {
                        reply.resize(size.min(60_000), b'x');
                    }
                    if sock.send_to(&reply, peer).is_ok() {
                        sv.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(Self {
            name: name.into(),
            addr,
            stop,
            threads: vec![t],
            conns: Arc::default(),
            served,
        })
    }

    /// Closes the listening socket (new connections are refused) but keeps serving the
    /// connections already open: a backend whose service port died.
    pub fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().ok();
        }
    }

    /// Stops accepting and closes every open connection (a crashed backend).
    pub fn stop(&mut self) {
        self.stop_accepting();
        for c in self.conns.lock().unwrap().drain(..) {
            c.shutdown(std::net::Shutdown::Both).ok();
        }
    }
}

impl Drop for NameServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_tcp(c: TcpStream, peer: SocketAddr, name: &str, served: &AtomicU64) {
    c.set_read_timeout(Some(Duration::from_secs(600))).ok();
    let mut w = match c.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(c);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if w.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
                    return;
                }
                served.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A TCP name server `b<i>` on `0.0.0.0:port` in every backend namespace of `topo`.
pub fn tcp_on_backends(topo: &Topology, port: u16) -> Vec<NameServer> {
    topo.backends
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            NameServer::tcp(
                ns,
                std::net::SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port),
                &format!("b{i}"),
            )
            .expect("tcp name server")
        })
        .collect()
}

/// Opens a TCP connection from `src` (port chosen by the kernel) to `dst`, inside `ns`.
pub fn connect(
    ns: &NetNs,
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
) -> io::Result<TcpStream> {
    let (src, dst) = (SocketAddr::new(src.into(), 0), dst.into());
    let s = ns.run(|| {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        s.bind(&src.into())?;
        io::Result::Ok(s)
    })?;
    s.connect_timeout(&dst.into(), IO_TIMEOUT)?;
    let t = TcpStream::from(s);
    t.set_read_timeout(Some(IO_TIMEOUT))?;
    t.set_write_timeout(Some(IO_TIMEOUT))?;
    t.set_nodelay(true)?;
    Ok(t)
}

/// Sends one request on an open connection; returns the answering backend's name.
pub fn ask(c: &mut TcpStream) -> io::Result<String> {
    c.write_all(b"who\n")?;
    let mut r = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// One request on a new connection from `src`; returns the backend's name.
pub fn ask_once(
    ns: &NetNs,
    src: impl Into<IpAddr>,
    dst: impl Into<SocketAddr>,
) -> io::Result<String> {
    let mut c = connect(ns, src, dst)?;
    ask(&mut c)
}

/// A UDP socket bound to `src` inside `ns`.
pub fn udp_socket(ns: &NetNs, src: impl Into<IpAddr>) -> io::Result<UdpSocket> {
    let src = SocketAddr::new(src.into(), 0);
    let s = ns.run(|| UdpSocket::bind(src))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One datagram exchange; returns the backend's name.
pub fn udp_ask(s: &UdpSocket, dst: impl Into<SocketAddr>) -> io::Result<String> {
    s.send_to(b"who\n", dst.into())?;
    let mut buf = [0u8; 512];
    let (n, _) = s.recv_from(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf[..n])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}
