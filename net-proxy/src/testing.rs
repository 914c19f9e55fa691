//! What the modules' tests share.

/// Serialises an etherparse builder step (each has its own type) with
/// `payload`; the three-argument form is for the raw-IP steps that also
/// take the payload's IP protocol number.
macro_rules! build {
    ($step:expr, $payload:expr) => {{
        let step = $step;
        let payload: &[u8] = $payload;
        let mut frame = Vec::with_capacity(step.size(payload.len()));
        step.write(&mut frame, payload).expect("build frame");
        frame
    }};
    ($step:expr, $ip_number:expr, $payload:expr) => {{
        let step = $step;
        let payload: &[u8] = $payload;
        let mut frame = Vec::with_capacity(step.size(payload.len()));
        step.write(&mut frame, $ip_number, payload)
            .expect("build frame");
        frame
    }};
}

pub(crate) use build;
