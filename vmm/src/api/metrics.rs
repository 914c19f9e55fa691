//! Prometheus text exposition (format 0.0.4) of [`Metrics`].

use std::fmt::Write;

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
    out
}

#[cfg(test)]
mod tests {
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
        // Every sample line belongs to a family announced before it.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(text.contains(&format!("# TYPE {name} ")), "{line}");
        }
    }
}
