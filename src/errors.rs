//! The one place where failures become HTTP statuses (pinned by a test below).

use pingora::{Error, ErrorSource, ErrorType};

/// The status a client gets for a failed request, and a one-line reason for the body.
/// `0`: the client connection is already gone, nothing can be sent.
pub fn status_for(e: &Error) -> (u16, &'static str) {
    use ErrorType::*;
    match (e.esource(), e.etype()) {
        (_, HTTPStatus(code)) => (*code, reason(*code)),
        (ErrorSource::Upstream, ConnectTimedout) => {
            (504, "Odoo did not accept the connection in time")
        }
        (ErrorSource::Upstream, ReadTimedout | WriteTimedout) => {
            (504, "Odoo did not answer in time")
        }
        (
            ErrorSource::Upstream,
            ConnectRefused | ConnectNoRoute | ConnectError | ConnectProxyFailure | SocketError
            | BindError | TLSHandshakeFailure | TLSHandshakeTimedout | InvalidCert | HandshakeError,
        ) => (502, "Odoo refused the connection"),
        (ErrorSource::Upstream, _) => (
            502,
            "Odoo closed the connection or sent an invalid response",
        ),
        (ErrorSource::Downstream, ReadTimedout) => (408, "request body not received in time"),
        (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed | WriteTimedout) => {
            (0, "")
        }
        (ErrorSource::Downstream, _) => (400, "malformed request"),
        (ErrorSource::Internal | ErrorSource::Unset, _) => (500, "internal error"),
    }
}

/// Short reasons for the statuses erpgate itself produces.
pub fn reason(code: u16) -> &'static str {
    match code {
        400 => "malformed request",
        403 => "forbidden",
        404 => "no route for this request",
        408 => "request not received in time",
        413 => "request body larger than this route allows",
        429 => "too many requests",
        431 => "request header fields too large",
        502 => "bad gateway",
        503 => "no Odoo server available",
        504 => "Odoo did not answer in time",
        _ => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(t: ErrorType) -> Box<Error> {
        Error::new_up(t)
    }

    #[test]
    fn status_map_is_pinned() {
        use ErrorType::*;
        assert_eq!(status_for(&up(ConnectRefused)).0, 502);
        assert_eq!(status_for(&up(ConnectTimedout)).0, 504);
        assert_eq!(status_for(&up(ReadTimedout)).0, 504);
        assert_eq!(status_for(&up(ConnectionClosed)).0, 502);
        assert_eq!(status_for(&up(InvalidHTTPHeader)).0, 502);
        assert_eq!(status_for(&Error::new(HTTPStatus(413))).0, 413);
        assert_eq!(status_for(&Error::new_down(ReadTimedout)).0, 408);
        assert_eq!(status_for(&Error::new_down(ConnectionClosed)).0, 0);
        assert_eq!(status_for(&Error::new_down(InvalidHTTPHeader)).0, 400);
        assert_eq!(status_for(&Error::new_in(InternalError)).0, 500);
    }
}
