//! Any bytes as a bare pickle, with torch's storage persistent ids resolved.
#![no_main]

#[path = "../../tests/support/fuzz.rs"]
#[allow(dead_code)]
mod fuzz;

use libfuzzer_sys::fuzz_target;
use fuzz::{run_one, Target};
use tlens::io::pickle::Limits;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::default();
    assert!(run_one(Target::Pickle, data, &limits).is_some(), "panicked");
});
