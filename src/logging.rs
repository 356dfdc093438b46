//! Logging that never stalls the data path.
//!
//! A worker that logs formats its line on its own thread and hands it to a
//! bounded queue; one logger thread writes the queue to stderr. When stderr
//! stalls (a pipe nobody reads, journald under pressure) the queue fills
//! and further lines are dropped and counted ([`dropped`], exported as
//! `ringlb_log_lines_dropped_total`) instead of blocking the worker.
//! Filtering is `RUST_LOG`'s, through the `env_filter` crate (the filter
//! env_logger uses), and the line format is env_logger's.
//!
//! [`RateLimit`] keeps a warning that can repeat once per connection (a
//! failed pipe, a refused socket) to one line per period, and says how
//! many were held back.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{Log, Metadata, Record};

/// Lines the queue holds before it drops: a few seconds of a debug log
/// (a line or two per connection) at full rate, a few hundred KiB.
pub const QUEUE_LINES: usize = 4096;
/// The logger thread writes at most this much at once, so a burst costs
/// few system calls without holding an unbounded batch.
const BATCH_BYTES: usize = 64 * 1024;
/// How long [`flush`] waits for the queue to reach stderr at exit: a
/// stalled stderr must not keep a stopped ringlb from exiting.
const FLUSH_WITHIN: Duration = Duration::from_secs(1);

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines lost since start: the queue was full (stderr too slow or
/// stalled) or stderr refused them.
pub fn dropped() -> u64 {
    DROPPED.load(Relaxed)
}

enum Msg {
    Line(String),
    /// Acknowledged once every line queued before it has been written.
    Flush(SyncSender<()>),
}

enum Sink {
    Queue(SyncSender<Msg>),
    /// Only when the logger thread cannot start.
    Direct,
}

struct QueueLogger {
    filter: env_filter::Filter,
    sink: Sink,
    dropped: &'static AtomicU64,
}

/// Installs the logger: `RUST_LOG` filters (default `info`). Call once,
/// first thing in `main`; [`flush`] before the process exits.
pub fn init() {
    let spec = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    let filter = env_filter::Builder::new().parse(&spec).build();
    let level = filter.filter();
    let (sink, failure) = match start_writer() {
        Ok(tx) => (Sink::Queue(tx), None),
        Err(e) => (Sink::Direct, Some(e)),
    };
    let logger = QueueLogger {
        filter,
        sink,
        dropped: &DROPPED,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
    if let Some(e) = failure {
        log::warn!(
            "cannot start the logger thread ({e}): logging straight to stderr, \
             where a stalled reader stalls ringlb"
        );
    }
}

/// Writes what is queued, waiting at most [`FLUSH_WITHIN`]. Call before
/// exiting, and before printing to stderr directly, so lines keep their order.
pub fn flush() {
    log::logger().flush();
}

fn start_writer() -> std::io::Result<SyncSender<Msg>> {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    std::thread::Builder::new()
        .name("ringlb-log".into())
        .spawn(move || {
            block_signals();
            write_lines(&rx, std::io::stderr(), &DROPPED);
        })?;
    Ok(tx)
}

/// ringlb takes its signals synchronously on the main thread (sigtimedwait);
/// a signal delivered here instead would take its default action and kill
/// the process. This thread starts before main blocks them, so it blocks
/// them itself.
fn block_signals() {
    // SAFETY: the set is initialised by sigfillset before use; the calls
    // only change this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        // Faults raised by this thread's own code must still end it.
        for fault in [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL] {
            libc::sigdelset(&mut set, fault);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// The logger thread: batches what is queued into one write.
fn write_lines(rx: &Receiver<Msg>, mut out: impl Write, dropped: &AtomicU64) {
    let mut batch = String::new();
    let mut acks = Vec::new();
    let mut report = DropReport::default();
    while let Ok(first) = rx.recv() {
        let mut lines = 0u64;
        if let Some(line) = report.line(dropped.load(Relaxed), Instant::now()) {
            batch.push_str(&line);
            lines += 1;
        }
        let mut next = Ok(first);
        while let Ok(msg) = next {
            match msg {
                Msg::Line(line) => {
                    batch.push_str(&line);
                    lines += 1;
                }
                Msg::Flush(ack) => acks.push(ack),
            }
            if batch.len() >= BATCH_BYTES {
                break;
            }
            next = rx.try_recv();
        }
        if out
            .write_all(batch.as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            dropped.fetch_add(lines, Relaxed);
        }
        batch.clear();
        for ack in acks.drain(..) {
            let _ = ack.try_send(());
        }
    }
}

/// How often the log may say that lines were dropped.
const DROP_REPORT_PERIOD: Duration = Duration::from_secs(10);

/// A reader of the log should learn from the log itself that lines are
/// missing, not only from the metric: one line when the count has grown,
/// at most once per [`DROP_REPORT_PERIOD`].
#[derive(Default)]
struct DropReport {
    reported: u64,
    last: Option<Instant>,
}

impl DropReport {
    fn line(&mut self, dropped: u64, now: Instant) -> Option<String> {
        let due = self
            .last
            .is_none_or(|at| now.saturating_duration_since(at) >= DROP_REPORT_PERIOD);
        if dropped <= self.reported || !due {
            return None;
        }
        let lost = dropped - self.reported;
        self.reported = dropped;
        self.last = Some(now);
        Some(format_line(
            SystemTime::now(),
            &Record::builder()
                .args(format_args!(
                    "{lost} log lines dropped: stderr did not keep up \
                     (ringlb_log_lines_dropped_total counts them all)"
                ))
                .level(log::Level::Warn)
                .target(module_path!())
                .build(),
        ))
    }
}

impl Log for QueueLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        self.filter.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if !self.filter.matches(record) {
            return;
        }
        let line = format_line(SystemTime::now(), record);
        match &self.sink {
            Sink::Queue(tx) => {
                if tx.try_send(Msg::Line(line)).is_err() {
                    self.dropped.fetch_add(1, Relaxed);
                }
            }
            Sink::Direct => {
                if std::io::stderr().write_all(line.as_bytes()).is_err() {
                    self.dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }

    fn flush(&self) {
        let Sink::Queue(tx) = &self.sink else {
            return;
        };
        let deadline = Instant::now() + FLUSH_WITHIN;
        let (ack_tx, ack_rx) = sync_channel(1);
        let mut msg = Msg::Flush(ack_tx);
        loop {
            match tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                    msg = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let _ = ack_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// env_logger's format with millisecond timestamps, which tests and
/// operators' scripts read: `[2026-12-01T14:06:52.123Z INFO  target] message`.
fn format_line(now: SystemTime, record: &Record<'_>) -> String {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let of_day = secs % 86_400;
    let mut line = String::with_capacity(128);
    let _ = writeln!(
        line,
        "[{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z {:<5} {}] {}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60,
        since.subsec_millis(),
        record.level(),
        record.target(),
        record.args()
    );
    line
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`): no date crate for one line format.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// One line per `period`; the lines held back in between are counted and
/// reported with the next line written.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
    /// Between the last two lines written: what the held-back count covers.
    span: Duration,
}

impl RateLimit {
    pub const fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: None,
            suppressed: 0,
            span: Duration::ZERO,
        }
    }

    /// `Some(n)` when a line may be written now, `n` being how many were
    /// held back since the last one; `None` when this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < self.period)
        {
            self.suppressed += 1;
            return None;
        }
        self.span = self
            .last
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }

    /// The suffix for a line written after `held_back` were suppressed.
    pub fn suffix(&self, held_back: u64) -> String {
        if held_back == 0 {
            String::new()
        } else {
            // Said with the time it covers: the next line may come hours
            // after a burst.
            format!(
                " ({held_back} more in the {}s since the last such line)",
                self.span.as_secs()
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logger(capacity: usize, dropped: &'static AtomicU64) -> (QueueLogger, Receiver<Msg>) {
        let (tx, rx) = sync_channel(capacity);
        let filter = env_filter::Builder::new().parse("debug").build();
        let logger = QueueLogger {
            filter,
            sink: Sink::Queue(tx),
            dropped,
        };
        (logger, rx)
    }

    fn log_line(logger: &QueueLogger, message: &str) {
        logger.log(
            &Record::builder()
                .args(format_args!("{message}"))
                .level(log::Level::Info)
                .target("ringlb::worker")
                .build(),
        );
    }

    #[test]
    fn dates_match_the_calendar() {
        for (secs, date) in [
            (0, (1970, 1, 1)),
            (68_169_600, (1972, 2, 29)),
            (951_782_400, (2000, 2, 29)),
            (1_764_597_994, (2025, 12, 1)),
            (4_102_444_799, (2099, 12, 31)),
        ] {
            assert_eq!(civil_from_days(secs / 86_400), date, "{secs}");
        }
    }

    #[test]
    fn lines_keep_env_loggers_format() {
        let at = UNIX_EPOCH + Duration::from_millis(1_764_597_994_042);
        let line = format_line(
            at,
            &Record::builder()
                .args(format_args!("frontend web listening"))
                .level(log::Level::Info)
                .target("ringlb::server")
                .build(),
        );
        assert_eq!(
            line,
            "[2025-12-01T14:06:34.042Z INFO  ringlb::server] frontend web listening\n"
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_without_blocking() {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let (logger, rx) = logger(3, &COUNT);
        for i in 0..10 {
            log_line(&logger, &format!("line {i}"));
        }
        assert_eq!(COUNT.load(Relaxed), 7);
        let kept: Vec<String> = rx
            .try_iter()
            .filter_map(|m| match m {
                Msg::Line(l) => Some(l),
                Msg::Flush(_) => None,
            })
            .collect();
        assert_eq!(kept.len(), 3);
        assert!(kept[0].ends_with("] line 0\n"), "{kept:?}");
    }

    #[test]
    fn flush_waits_for_the_queue_to_be_written() {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let (logger, rx) = logger(16, &COUNT);
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = SharedVec(std::sync::Arc::clone(&written));
        std::thread::spawn(move || write_lines(&rx, sink, &COUNT));
        log_line(&logger, "one");
        log_line(&logger, "two");
        logger.flush();
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        assert!(
            text.contains("] one\n") && text.contains("] two\n"),
            "{text:?}"
        );
        assert_eq!(COUNT.load(Relaxed), 0);
    }

    #[test]
    fn lines_stderr_refuses_are_counted() {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let (logger, rx) = logger(16, &COUNT);
        log_line(&logger, "one");
        log_line(&logger, "two");
        drop(logger);
        write_lines(&rx, Refuse, &COUNT);
        assert_eq!(COUNT.load(Relaxed), 2);
    }

    #[test]
    fn the_log_says_when_lines_were_dropped() {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let (logger, rx) = logger(16, &COUNT);
        COUNT.store(5, Relaxed);
        log_line(&logger, "after the stall");
        drop(logger);
        let written = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        write_lines(&rx, SharedVec(std::sync::Arc::clone(&written)), &COUNT);
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(
            lines[0].contains("WARN  ringlb::logging] 5 log lines dropped"),
            "{text}"
        );
        assert!(lines[1].ends_with("] after the stall"), "{text}");

        let mut report = DropReport::default();
        let t0 = Instant::now();
        assert!(report.line(0, t0).is_none());
        assert!(
            report
                .line(3, t0)
                .is_some_and(|l| l.contains("] 3 log lines"))
        );
        assert!(report.line(9, t0 + Duration::from_secs(1)).is_none());
        let later = report.line(9, t0 + DROP_REPORT_PERIOD);
        assert!(later.is_some_and(|l| l.contains("] 6 log lines")));
    }

    struct SharedVec(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for SharedVec {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Refuse;

    impl Write for Refuse {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn one_line_per_period_with_the_count_held_back() {
        let mut limit = RateLimit::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(limit.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(limit.allow(t0 + Duration::from_secs(i)), None);
        }
        assert_eq!(limit.allow(t0 + Duration::from_secs(10)), Some(5));
        assert_eq!(
            limit.suffix(5),
            " (5 more in the 10s since the last such line)"
        );
        assert_eq!(limit.allow(t0 + Duration::from_secs(3600)), Some(0));
        assert_eq!(limit.allow(t0 + Duration::from_secs(3601)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(7200)), Some(1));
        assert_eq!(
            limit.suffix(1),
            " (1 more in the 3600s since the last such line)"
        );
        assert_eq!(limit.suffix(0), "");
    }
}
