//! What [`serve`](super::serve) runs: the [`App`] trait and its three
//! kinds, told apart by a marker type the compiler infers.
//!
//! | kind | what it is | each connection gets |
//! |---|---|---|
//! | [`Tower`] | a tower `Service<Request<Incoming>>` + `Clone`: an axum `Router`, a `tower-http` stack | a clone |
//! | [`Hyper`] | a hyper `Service<Request<Incoming>>` + `Clone`: `hyper::service::service_fn` | a clone |
//! | [`MakeService`] | a tower `Service<Addr>` (`Addr: Clone`) whose response is a tower service + `Clone`: axum's `into_make_service_with_connect_info::<SocketAddr>()` | what it returns for the peer's address |
//!
//! `Addr` is the [`Listener`](super::Listener)'s peer address:
//! `SocketAddr` for a `TcpListener`. A make-service's future runs in the
//! connection's task (after its handshake, if any); if it fails, that
//! connection is closed and the others go on. Its `poll_ready` is polled
//! before each accept. A type that is two of these kinds at once (none of
//! axum's, tower's or hyper's types is) cannot be inferred; wrap it to say
//! which one is meant.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Incoming};
use hyper::{Request, Response};
use hyper_util::service::TowerToHyperService;

use super::BoxError;

/// Marks an [`App`] that is a tower service, such as an axum `Router`.
#[derive(Debug)]
pub enum Tower {}

/// Marks an [`App`] that is a hyper service, such as
/// `hyper::service::service_fn`.
#[derive(Debug)]
pub enum Hyper {}

/// Marks an [`App`] that makes a service for each connection from the
/// peer's address, such as axum's `into_make_service_with_connect_info`.
#[derive(Debug)]
pub enum MakeService {}

mod sealed {
    pub trait Sealed<Addr, Kind> {}
}

/// The service future of a connection: the service, or why there is none.
pub(super) type MakeFuture<S> = Pin<Box<dyn Future<Output = Result<S, BoxError>> + Send>>;

/// What [`serve`](super::serve) and [`Server::serve`](super::Server::serve)
/// run: an axum `Router` or any tower service, a hyper service, or a
/// make-service that is called once per connection with the peer's address
/// (so axum's `ConnectInfo` works). See the [module docs](self) for the
/// three kinds; `Kind` is inferred, a caller never names it.
///
/// Sealed: it is implemented for every type that fits one of the kinds.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot serve HTTP connections from a listener whose peer address is `{Addr}`",
    label = "not a service for `Request<hyper::body::Incoming>` that is `Clone + Send + 'static`, nor a make-service for `{Addr}`",
    note = "pass an axum `Router` (or any tower service), a hyper service such as `hyper::service::service_fn(..)`, or a make-service such as `router.into_make_service_with_connect_info::<SocketAddr>()`; its futures must be `Send + 'static` and its errors convert into `Box<dyn Error + Send + Sync>`"
)]
pub trait App<Addr, Kind>: sealed::Sealed<Addr, Kind> + Send + 'static {
    /// The hyper service one connection runs.
    #[doc(hidden)]
    type Service: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Self::Body>,
            Error: Into<BoxError>,
            Future: Send + 'static,
        > + Send
        + 'static;
    /// Its response body.
    #[doc(hidden)]
    type Body: Body<Data: Send, Error: Into<BoxError>> + Send + 'static;

    /// Whether [`make`](Self::make) may be called (tower's `poll_ready`).
    #[doc(hidden)]
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>>;

    /// The service for a connection from `peer`. The future runs in the
    /// connection's task, not in the accept loop.
    #[doc(hidden)]
    fn make(&mut self, peer: &Addr) -> MakeFuture<Self::Service>;
}

impl<Addr, S, B> sealed::Sealed<Addr, Tower> for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
}

impl<Addr, S, B> App<Addr, Tower> for S
where
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type Service = TowerToHyperService<S>;
    type Body = B;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Each request's clone is readied before it is called.
        Poll::Ready(Ok(()))
    }

    fn make(&mut self, _: &Addr) -> MakeFuture<Self::Service> {
        let service = TowerToHyperService::new(self.clone());
        Box::pin(std::future::ready(Ok(service)))
    }
}

impl<Addr, S, B> sealed::Sealed<Addr, Hyper> for S
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
}

impl<Addr, S, B> App<Addr, Hyper> for S
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type Service = S;
    type Body = B;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn make(&mut self, _: &Addr) -> MakeFuture<Self::Service> {
        Box::pin(std::future::ready(Ok(self.clone())))
    }
}

impl<Addr, M, S, B> sealed::Sealed<Addr, MakeService> for M
where
    Addr: Clone,
    M: tower_service::Service<Addr, Response = S> + Send + 'static,
    M::Future: Send + 'static,
    M::Error: Into<BoxError>,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
}

impl<Addr, M, S, B> App<Addr, MakeService> for M
where
    Addr: Clone,
    M: tower_service::Service<Addr, Response = S> + Send + 'static,
    M::Future: Send + 'static,
    M::Error: Into<BoxError>,
    S: tower_service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body<Data: Send, Error: Into<BoxError>> + Send + 'static,
{
    type Service = TowerToHyperService<S>;
    type Body = B;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::poll_ready(self, cx).map_err(Into::into)
    }

    fn make(&mut self, peer: &Addr) -> MakeFuture<Self::Service> {
        let made = tower_service::Service::call(self, peer.clone());
        Box::pin(async move { made.await.map(TowerToHyperService::new).map_err(Into::into) })
    }
}
