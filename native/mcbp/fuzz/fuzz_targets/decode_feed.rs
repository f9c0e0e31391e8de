//! Arbitrary bytes through decode, dcp fields and the splitter (both sides, cut at a point taken
//! from the input, with a small budget): nothing may panic, and the splitter must make progress.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcbp::{decode, fields, Decoded, FeedOutput, FeedStatus, Side, Splitter};

fuzz_target!(|data: &[u8]| {
    if let Ok(Decoded::Frame(frame, _)) = decode(data, 1 << 20) {
        let _ = fields(&frame);
        let _ = frame.to_vec();
    }
    let (cut, budget) = match data.first() {
        Some(&b) => (b as usize % (data.len() + 1), (b as usize % 7) + 1),
        None => (0, 1),
    };
    for side in [Side::Consumer, Side::Producer] {
        let mut splitter = Splitter::new(side, 1 << 16);
        let mut forwarded = 0usize;
        for chunk in [&data[..cut], &data[cut..]] {
            let mut from = 0;
            loop {
                let mut out = FeedOutput::default();
                match splitter.feed(chunk, from, budget, &mut out) {
                    Ok(FeedStatus::Done) => {
                        forwarded += out.forward_bytes(chunk).len();
                        break;
                    }
                    Ok(FeedStatus::Stopped(next)) => {
                        assert!(next > from && next <= chunk.len());
                        forwarded += out.forward_bytes(chunk).len();
                        from = next;
                    }
                    Err(_) => break,
                }
            }
        }
        assert!(forwarded <= data.len());
    }
});
