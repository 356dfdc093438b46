#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ringlb_fuzz::cidr_list(data));
