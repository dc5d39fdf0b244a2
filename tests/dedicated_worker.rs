//! The shared wasm tests (tests/common), run in a dedicated worker global scope.
#![cfg(target_arch = "wasm32")]

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_dedicated_worker);

mod common;
