//! The ClientHello parser on arbitrary bytes: it must never panic, never
//! read past its input, and agree with itself on every prefix (a prefix
//! of a complete hello is never refused as malformed before the whole).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlb::hello::{MAX_HELLO, Parsed, Router, parse};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_HELLO + 64)];
    let whole = parse(data);
    if let Parsed::Complete(hello) = &whole {
        if let Some(name) = &hello.server_name {
            let routes = [vec!["*.example.com".to_string()], vec![name.as_str().to_string()]];
            let router = Router::new(routes.iter().map(Vec::as_slice));
            assert_eq!(router.route(name.as_str()), Some(1));
        }
    }
    if data.len() < MAX_HELLO && matches!(whole, Parsed::Incomplete) {
        for cut in 0..data.len() {
            assert!(!matches!(parse(&data[..cut]), Parsed::Complete(_)));
        }
    }
});
