//! The shared wasm tests (tests/common), run in a service worker global scope.
#![cfg(target_arch = "wasm32")]

wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_service_worker);

mod common;
