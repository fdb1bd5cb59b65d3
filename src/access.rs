//! The access log: one structured line per request, target `erpgate::access`.
//! Never the query string (Odoo portal links carry access tokens there), `Authorization`,
//! cookies or bodies.

use crate::config::LogFormat;
use crate::proxy::Ctx;
use pingora::proxy::Session;
use pingora::Error;

/// What the line says of the request and its answer.
pub struct Line<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The status the client got (0: none).
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

impl<'a> Line<'a> {
    /// The line of a request Pingora's proxy handled.
    pub fn of(session: &'a Session, ctx: &Ctx) -> Line<'a> {
        let req = session.req_header();
        Line {
            method: req.method.as_str(),
            path: req.uri.path(),
            status: session
                .response_written()
                .map(|r| r.status.as_u16())
                .or(ctx.own_status())
                .unwrap_or(0),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
        }
    }
}

/// Writes the line.
pub fn write(line: &Line, e: Option<&Error>, ctx: &Ctx) {
    if !tracing::enabled!(target: "erpgate::access", tracing::Level::INFO) {
        return;
    }
    let f = Fields {
        client: Client(ctx.client()),
        method: line.method,
        path: line.path,
        status: line.status,
        class: ctx.class_name(),
        pool: ctx.pool_name(),
        upstream: ctx.server_address(),
        bytes_in: line.bytes_in,
        bytes_out: line.bytes_out,
        duration_ms: ctx.started().elapsed().as_secs_f64() * 1000.0,
        request_id: ctx.request_id(),
        error: e.map(|e| e.etype().as_str()).unwrap_or(""),
    };
    match crate::server::access_log() {
        Some((lines, format)) => BUF.with_borrow_mut(|buf| {
            buf.clear();
            f.format(format, std::time::SystemTime::now(), buf);
            lines.append(buf);
        }),
        None => f.trace(),
    }
}

thread_local! {
    /// Where a thread formats its access lines.
    static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The fields of an access line.
struct Fields<'a> {
    client: Client,
    method: &'a str,
    path: &'a str,
    status: u16,
    class: &'a str,
    pool: &'a str,
    upstream: &'a str,
    bytes_in: usize,
    bytes_out: usize,
    duration_ms: f64,
    request_id: &'a str,
    error: &'a str,
}

impl Fields<'_> {
    /// The line as an event of the log's subscriber (its formatter writes it).
    fn trace(&self) {
        tracing::info!(
            target: "erpgate::access",
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status = self.status,
            class = self.class,
            pool = self.pool,
            upstream = self.upstream,
            bytes_in = self.bytes_in,
            bytes_out = self.bytes_out,
            duration_ms = %format_args!("{:.3}", self.duration_ms),
            request_id = self.request_id,
            error = self.error,
        );
    }

    /// The line as the log's subscriber writes it (to a file or pipe: no colours), written
    /// in one pass without going through its formatter (measured: the line cost 3.2 us of
    /// CPU per request through it, 1.3 us this way). A unit test holds the two to the same
    /// bytes.
    fn format(&self, format: LogFormat, now: std::time::SystemTime, out: &mut Vec<u8>) {
        use std::io::Write;
        let time = humantime::format_rfc3339_micros(now);
        // Writing to a Vec does not fail.
        let _ = match format {
            LogFormat::Human => writeln!(
                out,
                "{time}  INFO erpgate::access: client={} method={} path={} status={} class={:?} \
                 pool={:?} upstream={:?} bytes_in={} bytes_out={} duration_ms={:.3} \
                 request_id={:?} error={:?}",
                self.client,
                self.method,
                self.path,
                self.status,
                self.class,
                self.pool,
                self.upstream,
                self.bytes_in,
                self.bytes_out,
                self.duration_ms,
                self.request_id,
                self.error,
            ),
            LogFormat::Json => {
                let _ = write!(
                    out,
                    "{{\"timestamp\":\"{time}\",\"level\":\"INFO\",\"client\":\"{}\"",
                    self.client
                );
                json_str(out, "method", self.method);
                json_str(out, "path", self.path);
                let _ = write!(out, ",\"status\":{}", self.status);
                json_str(out, "class", self.class);
                json_str(out, "pool", self.pool);
                json_str(out, "upstream", self.upstream);
                let _ = write!(
                    out,
                    ",\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":\"{:.3}\"",
                    self.bytes_in, self.bytes_out, self.duration_ms
                );
                json_str(out, "request_id", self.request_id);
                json_str(out, "error", self.error);
                out.extend_from_slice(b",\"target\":\"erpgate::access\"}\n");
                Ok(())
            }
        };
    }
}

/// `,"key":value` with `value` as a JSON string.
fn json_str(out: &mut Vec<u8>, key: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\":");
    // Writing a string to a Vec does not fail.
    let _ = serde_json::to_writer(&mut *out, value);
}
/// The client's address as the line shows it ("-" when unknown), formatted only when the line
/// is written.
#[derive(Clone, Copy)]
struct Client(Option<std::net::IpAddr>);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What the log's subscriber writes for `f` (through its formatter), without the
    /// timestamp.
    fn traced(f: &Fields, format: LogFormat) -> String {
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        let writer = move || Sink(sink.clone());
        let filter = tracing_subscriber::EnvFilter::new("info");
        let subscriber = crate::server::subscriber(format, filter, writer, false);
        tracing::subscriber::with_default(subscriber, || f.trace());
        let line = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        without_time(&line, format)
    }

    fn without_time(line: &str, format: LogFormat) -> String {
        match format {
            LogFormat::Human => line["2026-11-26T23:16:35.396768Z".len()..].to_string(),
            LogFormat::Json => {
                let start = line.find("\"level\"").unwrap();
                line[start..].to_string()
            }
        }
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_line_written_directly_is_the_subscribers_line_byte_for_byte() {
        let lines = [
            Fields {
                client: Client(Some("203.0.113.9".parse().unwrap())),
                method: "GET",
                path: "/web/login",
                status: 200,
                class: "user",
                pool: "web",
                upstream: "10.0.0.1:8069",
                bytes_in: 0,
                bytes_out: 613,
                duration_ms: 1.23456,
                request_id: "7b9fbb1f2eb8b1fff705c4db75cc4273",
                error: "",
            },
            Fields {
                client: Client(None),
                method: "POST",
                path: "/web/dataset/call_kw/\"quoted\"\\x",
                status: 0,
                class: "-",
                pool: "-",
                upstream: "-",
                bytes_in: 121,
                bytes_out: 0,
                duration_ms: 60000.0,
                request_id: "a\u{7f}\u{e9}\"\n",
                error: "ConnectionClosed",
            },
        ];
        for f in &lines {
            for format in [LogFormat::Human, LogFormat::Json] {
                let mut direct = Vec::new();
                f.format(format, std::time::SystemTime::now(), &mut direct);
                let direct = String::from_utf8(direct).unwrap();
                assert_eq!(
                    without_time(&direct, format),
                    traced(f, format),
                    "{format:?}"
                );
            }
        }
    }

    #[test]
    fn the_timestamp_is_the_subscribers_utc_with_microseconds() {
        let f = Fields {
            client: Client(None),
            method: "GET",
            path: "/",
            status: 200,
            class: "user",
            pool: "web",
            upstream: "-",
            bytes_in: 0,
            bytes_out: 0,
            duration_ms: 0.0,
            request_id: "",
            error: "",
        };
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_795_735_395_396_768);
        let mut out = Vec::new();
        f.format(LogFormat::Human, at, &mut out);
        assert!(out.starts_with(b"2026-11-26T23:23:15.396768Z  INFO erpgate::access: client=- "));
        out.clear();
        f.format(LogFormat::Json, at, &mut out);
        assert!(
            out.starts_with(b"{\"timestamp\":\"2026-11-26T23:23:15.396768Z\",\"level\":\"INFO\",")
        );
    }
}
