//! A TCP proxy the test controls, placed between the service and PostgreSQL or RabbitMQ
//! so a test can break only its own connections while other tests share the same
//! servers: cut them (reset), delay them, stall them (held: nothing moves, then resume),
//! or black-hole them (held open, bytes silently dropped, as behind a failed-over proxy or
//! a dead network path — those connections never recover, new ones do once restored).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

/// What the proxy does with the bytes it is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(dead_code)] // each test uses the modes it needs
enum Mode {
    Forward,
    /// Forward each chunk after this long.
    Delay(Duration),
    /// Read nothing: the bytes wait in the kernel's buffers.
    Stall,
    /// Read and drop everything, keeping the connections open.
    Blackhole,
    /// Close every connection and refuse new ones.
    Cut,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: watch::Sender<Mode>,
}

#[allow(dead_code)] // each test uses the modes it needs
impl Proxy {
    /// Listens on a free local port and forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mode, mode_rx) = watch::channel(Mode::Forward);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if *mode_rx.borrow() == Mode::Cut {
                    drop(inbound); // refused while cut
                    continue;
                }
                let mode_rx = mode_rx.clone();
                tokio::spawn(async move {
                    let connect = TcpStream::connect(target);
                    let Ok(Ok(outbound)) =
                        tokio::time::timeout(Duration::from_secs(5), connect).await
                    else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    // A connection that lost bytes in a black hole is dead for good.
                    let dead = Arc::new(AtomicBool::new(false));
                    let up = pump(in_read, out_write, mode_rx.clone(), dead.clone());
                    let down = pump(out_read, in_write, mode_rx, dead);
                    tokio::select! {
                        () = up => {}
                        () = down => {}
                    }
                });
            }
        });
        Self { addr, mode }
    }

    /// Closes every open connection and refuses new ones.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Holds every connection open and drops every byte; the connections open until
    /// `restore` stay dead after it.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Stops moving bytes, keeping them buffered; `restore` moves them on.
    pub fn stall(&self) {
        self.mode.send_replace(Mode::Stall);
    }

    /// Forwards every chunk `by` late (`Duration::ZERO`: at once).
    pub fn delay(&self, by: Duration) {
        self.mode.send_replace(if by.is_zero() { Mode::Forward } else { Mode::Delay(by) });
    }

    /// Forwards again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }
}

/// Moves bytes from `from` to `to` as the mode says, until either side closes or the
/// proxy is cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    dead: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Cut => return,
            // Every connection open during a black hole is dead for good, busy or idle.
            Mode::Blackhole => dead.store(true, Ordering::Relaxed),
            Mode::Stall => {
                if mode.changed().await.is_err() {
                    return;
                }
                continue;
            }
            _ => {}
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A change of mode applies before the next read (a stall holds the bytes).
            changed = mode.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        let current = *mode.borrow();
        match current {
            Mode::Cut => return,
            Mode::Blackhole => {
                dead.store(true, Ordering::Relaxed);
                continue;
            }
            Mode::Delay(by) => tokio::time::sleep(by).await,
            Mode::Forward | Mode::Stall => {}
        }
        if dead.load(Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// `url` with its host and port replaced by `addr`.
pub fn via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let userinfo = authority.rsplit_once('@').map(|(u, _)| format!("{u}@")).unwrap_or_default();
    format!("{scheme}://{userinfo}{addr}/{path}")
}

/// The socket address of `url`'s host and port.
pub fn target_of(url: &str, default_port: u16) -> SocketAddr {
    let rest = url.split_once("://").expect("a URL").1;
    let authority = rest.split('/').next().unwrap();
    let hostport = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let hostport = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:{default_port}")
    };
    let hostport = hostport.replace("localhost", "127.0.0.1");
    hostport.parse().expect("host:port of the test database")
}
