//! The datapath's clock, read from user space.

/// `CLOCK_MONOTONIC` in ns: the clock `bpf_ktime_get_ns` reads, so user space and the
/// datapath compare timestamps on one time base.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Whole seconds between two monotonic timestamps (0 if `then` is in the future).
pub fn secs_since(now_ns: u64, then_ns: u64) -> u64 {
    now_ns.saturating_sub(then_ns) / 1_000_000_000
}

/// `unix` seconds as a UTC date and time, `YYYY-MM-DD HH:MM UTC` (the civil-from-days
/// algorithm of H. Hinnant's `chrono`-compatible date library).
pub fn utc(unix: i64) -> String {
    let (y, m, d, rem) = civil(unix);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// `unix_ms` as RFC 3339 UTC with milliseconds: `2026-12-02T14:00:00.123Z`.
pub fn rfc3339_ms(unix_ms: i64) -> String {
    let (y, m, d, rem) = civil(unix_ms.div_euclid(1000));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms.rem_euclid(1000)
    )
}

/// (year, month, day, seconds into the day) of `unix` seconds.
fn civil(unix: i64) -> (i64, i64, i64, i64) {
    let days = unix.div_euclid(86_400);
    let rem = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rem)
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00 UTC");
        assert_eq!(super::utc(1_796_220_000), "2026-12-02 14:00 UTC");
        assert_eq!(
            super::rfc3339_ms(1_796_220_000_123),
            "2026-12-02T14:00:00.123Z"
        );
    }
}
