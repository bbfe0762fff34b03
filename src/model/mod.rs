//! The model side: TransformerLens's config, state dict, the hooked forward pass and its hooks,
//! and the tabulated pass that specialises it for 1-layer models.

pub mod config;
pub mod hooked;
pub mod hooks;
pub mod state_dict;
pub mod tabulated;

pub use config::HookedTransformerConfig;
pub use hooked::HookedTransformer;
pub use hooks::{get_act_name, ActivationCache, Hook, NameFilter};
pub use state_dict::{is_buffer, tl_order_key, StateDict};
