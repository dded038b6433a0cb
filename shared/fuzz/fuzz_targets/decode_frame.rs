//! Arbitrary bytes on the gateway's port: the frame decoder must never panic, and must always
//! either consume a frame, ask for more bytes without consuming any, or refuse.
#![no_main]

use actidash_shared::wire::Frame;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    loop {
        let before = buf.len();
        match Frame::decode(&mut buf, 1 << 16) {
            Ok(Some(frame)) => {
                assert!(buf.len() < before, "a frame consumed nothing");
                // What decodes re-encodes to something that decodes to the same frame.
                let again = Frame::decode(&mut BytesMut::from(&frame.to_bytes()[..]), 1 << 20);
                assert_eq!(again, Ok(Some(frame)));
            }
            Ok(None) => {
                assert_eq!(buf.len(), before, "need-more-bytes consumed input");
                break;
            }
            Err(_) => break,
        }
    }
});
