//! Prometheus text exposition (format 0.0.4) of [`Metrics`].

use std::fmt::Write;

use colo::control::{Cause, Histogram, State};

use super::Metrics;

/// Escapes a label value: backslash, double quote and newline.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every counter.
pub fn render(m: &Metrics) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "colo_vmm_uptime_seconds",
        "gauge",
        "Seconds since the VM was created.",
    );
    let _ = writeln!(out, "colo_vmm_uptime_seconds {:.3}", m.uptime_secs);
    family(
        &mut out,
        "colo_vmm_exits_total",
        "counter",
        "KVM exits of all vCPUs by reason.",
    );
    for (reason, n) in &m.exits {
        let _ = writeln!(
            out,
            "colo_vmm_exits_total{{reason=\"{}\"}} {n}",
            label(reason)
        );
    }
    family(
        &mut out,
        "colo_vmm_serial_tx_bytes_total",
        "counter",
        "Bytes the guest wrote to its serial console.",
    );
    let _ = writeln!(out, "colo_vmm_serial_tx_bytes_total {}", m.serial_tx_bytes);
    type Family = (&'static str, &'static str, fn(&super::DeviceMetrics) -> u64);
    let per_device: [Family; 4] = [
        (
            "colo_vmm_virtio_requests_total",
            "Requests (blk) or frames (net) handled.",
            |d| d.requests,
        ),
        (
            "colo_vmm_virtio_read_bytes_total",
            "Bytes moved into the guest (blk reads, net rx).",
            |d| d.read_bytes,
        ),
        (
            "colo_vmm_virtio_write_bytes_total",
            "Bytes moved out of the guest (blk writes, net tx).",
            |d| d.write_bytes,
        ),
        (
            "colo_vmm_virtio_errors_total",
            "Requests failed or frames dropped.",
            |d| d.errors,
        ),
    ];
    for (name, help, value) in per_device {
        family(&mut out, name, "counter", help);
        for d in &m.devices {
            let _ = writeln!(
                out,
                "{name}{{device=\"{}\",kind=\"{}\"}} {}",
                label(&d.name),
                label(&d.kind),
                value(d)
            );
        }
    }
    if let Some(colo) = &m.colo {
        render_colo(&mut out, colo);
    }
    out
}

/// The replication's families: every cause and every state has a sample,
/// zero or not.
fn render_colo(out: &mut String, m: &colo::control::Metrics) {
    family(
        out,
        "colo_checkpoints_total",
        "counter",
        "Committed checkpoints by cause.",
    );
    for cause in Cause::ALL {
        let n: u64 = m
            .checkpoints
            .iter()
            .filter(|(c, _)| *c == cause)
            .map(|(_, n)| n)
            .sum();
        let _ = writeln!(
            out,
            "colo_checkpoints_total{{cause=\"{}\"}} {n}",
            cause.name()
        );
    }
    histogram(
        out,
        "colo_checkpoint_pause_seconds",
        "Guest pause per checkpoint.",
        &m.pause,
    );
    histogram(
        out,
        "colo_checkpoint_transfer_seconds",
        "From a checkpoint's capture to the secondary's ack.",
        &m.transfer,
    );
    let p = &m.proxy;
    let plain: [(&str, &str, &str, u64); 12] = [
        (
            "colo_checkpoint_bytes_total",
            "counter",
            "Bytes of checkpoint data sent (primary) or received (secondary).",
            m.checkpoint_bytes,
        ),
        (
            "colo_held_frames",
            "gauge",
            "Guest frames held until their checkpoint commits.",
            m.held_frames,
        ),
        (
            "colo_held_bytes",
            "gauge",
            "Bytes of the held guest frames.",
            m.held_bytes,
        ),
        (
            "colo_failovers_total",
            "counter",
            "Failovers this vmm carried out.",
            m.failovers,
        ),
        (
            "colo_compared_frames_total",
            "counter",
            "COLO: guest frames the compare proxy compared (primary).",
            p.compared_frames,
        ),
        (
            "colo_matched_frames_total",
            "counter",
            "COLO: guest frames released because the other VM sent the same (primary).",
            p.matched_frames,
        ),
        (
            "colo_proxy_held_frames",
            "gauge",
            "COLO: guest frames the compare proxy holds (primary).",
            p.held_frames,
        ),
        (
            "colo_proxy_queue_depth",
            "gauge",
            "COLO: secondary frames waiting for their twin (primary), client frames waiting \
             for the secondary VM (secondary).",
            p.queue_depth,
        ),
        (
            "colo_tracked_connections",
            "gauge",
            "COLO: connections the compare proxy tracks (primary).",
            p.connections,
        ),
        (
            "colo_rewritten_connections",
            "gauge",
            "COLO: connections whose sequence numbers are rewritten (secondary).",
            p.rewritten_connections,
        ),
        (
            "colo_mirrored_frames_total",
            "counter",
            "COLO: frames sent to the peer on the mirror connection.",
            p.mirrored_frames,
        ),
        (
            "colo_mirror_dropped_frames_total",
            "counter",
            "COLO: frames dropped: the mirror connection behind, no such NIC, or a stale epoch.",
            p.dropped_frames,
        ),
    ];
    for (name, kind, help, value) in plain {
        family(out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    family(
        out,
        "colo_state",
        "gauge",
        "1 for the replication's current state, 0 for the others.",
    );
    for state in State::ALL {
        let _ = writeln!(
            out,
            "colo_state{{state=\"{}\"}} {}",
            state.name(),
            u8::from(m.state == Some(state))
        );
    }
}

/// A histogram family: cumulative `_bucket`s up to `+Inf`, `_sum`, `_count`.
fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram) {
    family(out, name, "histogram", help);
    for (bound, n) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::api::DeviceMetrics;

    #[test]
    fn renders_families_with_escaped_labels() {
        let mut m = Metrics {
            uptime_secs: 1.5,
            serial_tx_bytes: 42,
            ..Default::default()
        };
        m.exits.insert("io_out".into(), 7);
        m.devices.push(DeviceMetrics {
            name: "net\"0".into(),
            kind: "virtio-net".into(),
            requests: 3,
            read_bytes: 100,
            write_bytes: 200,
            errors: 1,
        });
        let text = render(&m);
        assert!(text.contains("# TYPE colo_vmm_exits_total counter\n"));
        assert!(text.contains("colo_vmm_exits_total{reason=\"io_out\"} 7\n"));
        assert!(text.contains("colo_vmm_serial_tx_bytes_total 42\n"));
        assert!(text.contains(
            "colo_vmm_virtio_read_bytes_total{device=\"net\\\"0\",kind=\"virtio-net\"} 100\n"
        ));
        assert!(text.contains("colo_vmm_uptime_seconds 1.500\n"));
        assert_families_announced(&text);
        assert!(!text.contains("colo_checkpoints_total"), "{text}");
    }

    /// Every sample line belongs to a family announced before it.
    fn assert_families_announced(text: &str) {
        for (at, line) in text.lines().enumerate() {
            if line.starts_with('#') {
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let typed = |family: &str| {
                text.lines()
                    .take(at)
                    .any(|l| l.starts_with(&format!("# TYPE {family} ")))
            };
            let histogram = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .any(|family| {
                    typed(family) && text.contains(&format!("# TYPE {family} histogram\n"))
                });
            assert!(typed(name) || histogram, "{line}");
        }
    }

    /// The samples of a text exposition: `name{labels}` to value.
    pub(crate) fn parse(text: &str) -> BTreeMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (key, value) = l.rsplit_once(' ').unwrap();
                (key.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    /// A histogram's buckets, in the order given, with their bounds.
    fn buckets(text: &str, name: &str) -> Vec<(String, f64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .map(|rest| {
                let (le, value) = rest.split_once("\"} ").unwrap();
                (le.to_string(), value.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn renders_replication_families() {
        let mut pause = Histogram::new();
        for ms in [0.05, 0.8, 3.0, 40.0, 20_000.0] {
            pause.observe(Duration::from_secs_f64(ms / 1000.0));
        }
        let m = Metrics {
            colo: Some(colo::control::Metrics {
                checkpoints: vec![(Cause::Periodic, 90), (Cause::Requested, 3)],
                pause: pause.clone(),
                transfer: Histogram::new(),
                checkpoint_bytes: 1 << 30,
                held_frames: 4,
                held_bytes: 6000,
                failovers: 1,
                state: Some(State::Protected),
                proxy: colo::control::ProxyStats {
                    compared_frames: 11,
                    matched_frames: 12,
                    held_frames: 13,
                    queue_depth: 14,
                    connections: 15,
                    rewritten_connections: 16,
                    mirrored_frames: 17,
                    dropped_frames: 18,
                },
            }),
            ..Default::default()
        };
        let text = render(&m);
        assert_families_announced(&text);
        let samples = parse(&text);
        let get = |key: &str| *samples.get(key).unwrap_or_else(|| panic!("{key}\n{text}"));
        for cause in Cause::ALL {
            let expected = match cause {
                Cause::Periodic => 90.0,
                Cause::Requested => 3.0,
                _ => 0.0,
            };
            let key = format!("colo_checkpoints_total{{cause=\"{}\"}}", cause.name());
            assert_eq!(get(&key), expected, "{key}");
        }
        assert_eq!(get("colo_checkpoint_bytes_total"), (1u64 << 30) as f64);
        assert_eq!(get("colo_held_frames"), 4.0);
        assert_eq!(get("colo_held_bytes"), 6000.0);
        assert_eq!(get("colo_failovers_total"), 1.0);
        for (name, value) in [
            ("colo_compared_frames_total", 11.0),
            ("colo_matched_frames_total", 12.0),
            ("colo_proxy_held_frames", 13.0),
            ("colo_proxy_queue_depth", 14.0),
            ("colo_tracked_connections", 15.0),
            ("colo_rewritten_connections", 16.0),
            ("colo_mirrored_frames_total", 17.0),
            ("colo_mirror_dropped_frames_total", 18.0),
        ] {
            assert_eq!(get(name), value, "{name}");
        }
        assert!(text.contains("# TYPE colo_proxy_queue_depth gauge\n"));
        assert!(text.contains("# TYPE colo_mirrored_frames_total counter\n"));
        for state in State::ALL {
            let key = format!("colo_state{{state=\"{}\"}}", state.name());
            let expected = f64::from(u8::from(state == State::Protected));
            assert_eq!(get(&key), expected, "{key}");
        }
        // The pause histogram: cumulative, ascending bounds, +Inf last and
        // equal to the count; the sum in seconds.
        let pauses = buckets(&text, "colo_checkpoint_pause_seconds");
        assert_eq!(pauses.len(), Histogram::BOUNDS.len() + 1);
        assert_eq!(pauses.last().unwrap(), &("+Inf".to_string(), 5.0));
        let bounds: Vec<f64> = pauses[..pauses.len() - 1]
            .iter()
            .map(|(le, _)| le.parse().unwrap())
            .collect();
        assert_eq!(bounds, Histogram::BOUNDS);
        assert!(pauses.windows(2).all(|w| w[0].1 <= w[1].1), "{pauses:?}");
        let le = |bound: &str| pauses.iter().find(|(le, _)| le == bound).unwrap().1;
        assert_eq!(
            (le("0.0001"), le("0.001"), le("0.005"), le("0.05"), le("10")),
            (1.0, 2.0, 3.0, 4.0, 4.0)
        );
        assert_eq!(get("colo_checkpoint_pause_seconds_count"), 5.0);
        let sum = get("colo_checkpoint_pause_seconds_sum");
        assert!((sum - pause.sum).abs() < 1e-9, "{sum}");
        assert_eq!(get("colo_checkpoint_transfer_seconds_count"), 0.0);
        assert_eq!(
            get("colo_checkpoint_transfer_seconds_bucket{le=\"+Inf\"}"),
            0.0
        );
        // No state known: every state gauge is 0.
        let mut m = m;
        m.colo.as_mut().unwrap().state = None;
        let samples = parse(&render(&m));
        assert!(State::ALL
            .iter()
            .all(|s| { samples[&format!("colo_state{{state=\"{}\"}}", s.name())] == 0.0 }));
    }
}
