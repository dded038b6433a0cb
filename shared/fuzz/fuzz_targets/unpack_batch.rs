//! Arbitrary batch payloads (plain or zstd): unpacking must never panic, never allocate beyond
//! its limit, and only accept events of the batch's agent, tenant, source and span.
#![no_main]

use actidash_shared::batch::unpack;
use actidash_shared::wire::{Batch, Codec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, payload)) = data.split_first() else { return };
    let batch = Batch {
        source_id: "s".into(),
        first_seq: u64::from(head & 0x0F),
        count: u32::from(head >> 4) + 1,
        codec: if head & 0x80 != 0 { Codec::Zstd } else { Codec::Plain },
        payload: payload.to_vec().into(),
    };
    if let Ok(events) = unpack(&batch, "a", "t", 1 << 20) {
        let end = batch.first_seq + u64::from(batch.count);
        for (i, u) in events.iter().enumerate() {
            assert!(u.event.agent_id == "a" && u.event.tenant == "t" && u.event.source_id == "s");
            assert!(u.event.seq >= batch.first_seq && u.event.seq < end);
            if i > 0 {
                assert!(u.event.seq > events[i - 1].event.seq);
            }
        }
    }
});
