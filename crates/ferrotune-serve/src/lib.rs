//! ferrotune's inference server: one process serving named deployments behind one endpoint, as
//! Azure ML's managed online endpoints do (`/score`), as `mlflow models serve` does
//! (`/invocations`) and as OpenAI's API does (`/v1/chat/completions`, streaming), with
//! continuous batching, key auth, probes, metrics and graceful shutdown.

pub mod api;
pub mod auth;
pub mod deployments;
pub mod engine;
pub mod histogram;
pub mod server;
pub mod text;

pub use auth::Keys;
pub use deployments::{parse_traffic, Deployment, Endpoint};
pub use server::{router, serve, termination, warm_up, ServerOptions};
