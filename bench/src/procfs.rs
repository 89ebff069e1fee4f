//! Readings from `/proc`: process RSS and kernel TCP socket memory.

use std::fs;

/// The number after `key` (`VmRSS:`, `Slab:`) in a `key value kB` text such as
/// `/proc/<pid>/status` or `/proc/meminfo`.
fn parse_kb_line(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `VmRSS` in KiB from the text of a `/proc/<pid>/status` file.
pub fn parse_vm_rss_kb(status: &str) -> Option<u64> {
    parse_kb_line(status, "VmRSS:")
}

/// The `mem` field (pages) of the `TCP:` line of `/proc/net/sockstat`.
pub fn parse_sockstat_tcp_mem_pages(sockstat: &str) -> Option<u64> {
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut fields = line.split_whitespace().skip(1);
    while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
        if key == "mem" {
            return value.parse().ok();
        }
    }
    None
}

/// The `Slab:` line of a `/proc/meminfo` text, KiB.
pub fn parse_meminfo_slab_kb(meminfo: &str) -> Option<u64> {
    parse_kb_line(meminfo, "Slab:")
}

/// Kernel slab memory (system-wide, KiB): where socket structures live; noisy when
/// other work runs on the machine.
pub fn slab_kb() -> Option<u64> {
    parse_meminfo_slab_kb(&fs::read_to_string("/proc/meminfo").ok()?)
}

/// RSS of process `pid` in KiB, `None` if it cannot be read.
pub fn rss_kb(pid: u32) -> Option<u64> {
    parse_vm_rss_kb(&fs::read_to_string(format!("/proc/{pid}/status")).ok()?)
}

/// RSS of this process in KiB.
pub fn self_rss_kb() -> Option<u64> {
    parse_vm_rss_kb(&fs::read_to_string("/proc/self/status").ok()?)
}

/// Kernel memory held by TCP sockets, in pages (system-wide).
pub fn tcp_mem_pages() -> Option<u64> {
    parse_sockstat_tcp_mem_pages(&fs::read_to_string("/proc/net/sockstat").ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_rss() {
        let status = "Name:\ttether\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nRssAnon:\t 100 kB\n";
        assert_eq!(parse_vm_rss_kb(status), Some(12345));
        assert_eq!(parse_vm_rss_kb("Name:\tx\n"), None);
    }

    #[test]
    fn parses_sockstat_mem() {
        let sockstat =
            "sockets: used 230\nTCP: inuse 5 orphan 0 tw 2 alloc 7 mem 42\nUDP: inuse 1 mem 3\n";
        assert_eq!(parse_sockstat_tcp_mem_pages(sockstat), Some(42));
        assert_eq!(parse_sockstat_tcp_mem_pages("UDP: inuse 1 mem 3\n"), None);
    }

    #[test]
    fn parses_meminfo_slab() {
        assert_eq!(
            parse_meminfo_slab_kb("MemTotal: 10 kB\nSlab:   4321 kB\n"),
            Some(4321)
        );
    }

    #[test]
    fn reads_live_values() {
        assert!(self_rss_kb().is_some_and(|kb| kb > 0));
        assert!(tcp_mem_pages().is_some());
    }
}
