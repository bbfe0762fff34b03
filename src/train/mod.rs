//! Training like the reference: TL-identical initialisation (this module so far), and — to come
//! — exact gradients, AdamW and the demo's loop.

pub mod grad;
pub mod init;

pub use grad::{check_trainable, loss_and_grads};
pub use init::{init_weights, torch_normal};
