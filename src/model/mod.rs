//! The model side: TransformerLens's config and state dict types.

pub mod config;
pub mod state_dict;

pub use config::HookedTransformerConfig;
pub use state_dict::{is_buffer, tl_order_key, StateDict};
