//! Connections of both listeners, bounded: at most `server.connections.max` at once per
//! listener (beyond it, new connections wait in the kernel's backlog), and a connection
//! that sends nothing within `first_byte_timeout` is closed. hyper's own timers do the
//! rest: HTTP/1 headers within `header_read_timeout` (also after an idle keep-alive
//! pause), HTTP/2 pings every `keepalive_interval`, unanswered for `keepalive_timeout`.

use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Sleep,
};

use crate::conf;

/// What every accepted connection is held to.
#[derive(Clone)]
pub struct Guard {
    slots: Arc<Semaphore>,
    first_byte: Duration,
}

impl Guard {
    /// The bounds of `conf`, for one listener.
    pub fn new(conf: &conf::Connections) -> Self {
        Self { slots: Arc::new(Semaphore::new(conf.max)), first_byte: conf.first_byte_timeout }
    }

    /// The next connection on `listener`, once a slot is free.
    ///
    /// # Errors
    /// `accept` failed.
    pub async fn accept(&self, listener: &TcpListener) -> io::Result<Guarded> {
        let permit =
            self.slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        Ok(Guarded {
            stream,
            _slot: permit,
            first_byte: Some(Box::pin(tokio::time::sleep(self.first_byte))),
        })
    }
}

/// An accepted connection: its slot is given back when it is dropped.
pub struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    /// Until the client sent something: when it fires, reads fail.
    first_byte: Option<Pin<Box<Sleep>>>,
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if let Some(deadline) = self.first_byte.as_mut() {
            match read {
                Poll::Ready(Ok(())) if buf.filled().len() > before => self.first_byte = None,
                Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )));
                }
                _ => {}
            }
        }
        read
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
