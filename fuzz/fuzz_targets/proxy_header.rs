#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringlb_fuzz::proxy_header(data));
