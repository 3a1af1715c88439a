//! One connection's life: its handshake (TLS, if any), protocol detection,
//! then HTTP/1 or HTTP/2 run by the drain skeleton both share. Once the drain has started, [`drive`]
//! closes a connection gracefully at the moment its protocol module names:
//! HTTP/1 once idle for the grace, HTTP/2 at once if it has opened a stream,
//! else after the grace (its first request may be on its way).
//!
//! The connection's [`DrainGuard`] lives in its IO ([`ConnIo`](super::replay::ConnIo)),
//! so a connection hyper hands to the application as `Upgraded` stays
//! counted in the drain until the application drops it. A connection that
//! is upgraded, or streaming a response when the drain starts, is marked
//! [long-lived](DrainGuard::set_long_lived).

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper::{Request, Response};
use tokio::time::{Instant, Sleep};

use super::app::MakeFuture;
use super::detect::{detect, Detected, Protocol};
use super::h1::serve_h1;
use super::h2::serve_h2;
use super::handshake::Acceptor;
use super::{BoxError, Server};
use crate::drain::{Drain, DrainGuard};

/// The connection's place in the drain, shared by its IO and the code that
/// marks it long-lived.
pub(super) type ConnGuard = Arc<DrainGuard>;

/// One connection, from its accept: the handshake (bounded by the
/// handshake timeout), its service (made for it), protocol detection, then
/// HTTP/1 or HTTP/2. `guard` counts it in the drain all along.
pub(super) async fn serve_connection<I, H, S, B>(
    io: I,
    handshake: Arc<H>,
    service: MakeFuture<S>,
    drain: Drain,
    cfg: Arc<Server>,
    guard: DrainGuard,
) -> Result<(), BoxError>
where
    H: Acceptor<I>,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Once draining, a connection still in its handshake finishes it: its
    // client has sent its first bytes and waits for an answer.
    let mut io = match tokio::time::timeout(cfg.handshake_timeout, handshake.accept(io)).await {
        Ok(Ok(io)) => io,
        Ok(Err(e)) => return Err(format!("handshake failed: {e}").into()),
        Err(_) => {
            return Err(format!(
                "handshake not done within the handshake timeout ({:?})",
                cfg.handshake_timeout
            )
            .into())
        }
    };
    let service = service
        .await
        .map_err(|e| format!("no service for the connection: {e}"))?;
    let accepted = Instant::now();
    let mut drain_at = None;
    let (protocol, prefix) = match detect(&mut io, &drain, &cfg, accepted, &mut drain_at).await? {
        Detected::Protocol(p, prefix) => (p, prefix),
        Detected::Closed => return Ok(()),
        Detected::IdleDrained => {
            tracing::debug!("closing a connection that sent nothing during the idle grace");
            return Ok(());
        }
        Detected::TimedOut => {
            tracing::debug!(
                "closing a connection that sent no request within the header read timeout"
            );
            return Ok(());
        }
    };
    let guard = Arc::new(guard);
    match protocol {
        Protocol::Http1 => {
            serve_h1(io, prefix, service, drain, guard, &cfg, accepted, drain_at).await
        }
        Protocol::Http2 => {
            serve_h2(io, prefix, service, drain, guard, &cfg, accepted, drain_at).await
        }
    }
}

/// Runs a hyper connection to its end. Once the drain has started (at
/// `drain_at` if it had already, as detection saw it), calls `on_drain`
/// once, then asks `close_at` when the connection may be closed (`None`:
/// not while it is busy) and then calls `graceful_shutdown` on it, once. `close_at` is asked again after
/// every step of the connection, so what it looks at may change in between.
pub(super) async fn drive<C>(
    mut conn: Pin<&mut C>,
    drain: &Drain,
    mut drain_at: Option<Instant>,
    on_drain: impl FnOnce(),
    mut close_at: impl FnMut(Instant) -> Option<Instant>,
    mut graceful_shutdown: impl FnMut(Pin<&mut C>),
) -> Result<(), BoxError>
where
    C: Future<Output = hyper::Result<()>>,
{
    let mut draining = pin!(drain.draining());
    let mut timer = None;
    let mut closing = false;
    let mut on_drain = Some(on_drain);
    poll_fn(|cx| loop {
        // Poll the connection first: every change `close_at` looks at
        // happens inside this call (service, bodies and IO all run in it),
        // and a request that just arrived is read here before `close_at`
        // can take the connection for idle.
        if let Poll::Ready(r) = conn.as_mut().poll(cx) {
            return Poll::Ready(r.map_err(BoxError::from));
        }
        if closing {
            return Poll::Pending;
        }
        let at = match drain_at {
            Some(at) => at,
            None => match draining.as_mut().poll(cx) {
                Poll::Ready(_) => *drain_at.insert(Instant::now()),
                Poll::Pending => return Poll::Pending,
            },
        };
        if let Some(f) = on_drain.take() {
            f();
        }
        let Some(deadline) = close_at(at) else {
            return Poll::Pending;
        };
        if Instant::now() >= deadline {
            graceful_shutdown(conn.as_mut());
            closing = true;
            continue;
        }
        if poll_timer(&mut timer, deadline, cx).is_ready() {
            continue;
        }
        return Poll::Pending;
    })
    .await
}

/// Polls a lazily created timer set to `deadline`, resetting it when the
/// deadline moved.
pub(super) fn poll_timer(
    timer: &mut Option<(Instant, Pin<Box<Sleep>>)>,
    deadline: Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    match timer {
        Some((at, sleep)) => {
            if *at != deadline {
                *at = deadline;
                sleep.as_mut().reset(deadline);
            }
            sleep.as_mut().poll(cx)
        }
        None => {
            let (_, sleep) = timer.insert((deadline, Box::pin(tokio::time::sleep_until(deadline))));
            sleep.as_mut().poll(cx)
        }
    }
}
