//! Who is calling an XML-RPC endpoint: the first two parameters of the `methodCall` (the
//! database, then the login or uid, for `common.login/authenticate` and
//! `object.execute_kw`). The third, the password, is never read.

use quick_xml::events::Event;
use quick_xml::Reader;

/// A hash of the first two `<param>` values of an XML-RPC call, read from a body prefix.
pub fn identity(prefix: &[u8]) -> Option<u64> {
    let mut reader = Reader::from_reader(prefix);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut params: Vec<Vec<u8>> = Vec::new();
    let mut current: Option<Vec<u8>> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                let name = e.local_name().into_inner().as_bytes().to_vec();
                if path.len() > 64 {
                    return None;
                }
                path.push(name);
                if in_param(&path) && path.len() == 3 {
                    current = Some(Vec::new());
                }
            }
            Ok(Event::End(_)) => {
                if path.len() == 3 && in_param(&path) {
                    if let Some(v) = current.take() {
                        params.push(v);
                        if params.len() == 2 {
                            break;
                        }
                    }
                }
                path.pop();
            }
            Ok(Event::Text(t)) => {
                if let Some(v) = current.as_mut() {
                    let text: &[u8] = t.as_bytes();
                    let trimmed = text.trim_ascii();
                    if v.len() + trimmed.len() <= 256 {
                        v.extend_from_slice(trimmed);
                    }
                }
            }
            Ok(Event::CData(t)) => {
                if let Some(v) = current.as_mut() {
                    let text: &[u8] = t.as_bytes();
                    v.extend_from_slice(&text[..text.len().min(256)]);
                }
            }
            Ok(Event::GeneralRef(r)) => {
                if let Some(v) = current.as_mut() {
                    v.push(b'&');
                    let name: &[u8] = r.as_bytes();
                    v.extend_from_slice(&name[..name.len().min(32)]);
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if params.len() < 2 {
        return None;
    }
    Some(crate::jsonrpc::rpc_identity(&params[0], &params[1]))
}

fn in_param(path: &[Vec<u8>]) -> bool {
    path.len() >= 3 && path[0] == b"methodCall" && path[1] == b"params" && path[2] == b"param"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(db: &str, user: &str, password: &str) -> String {
        format!(
            "<?xml version='1.0'?>\n<methodCall>\n<methodName>execute_kw</methodName>\n<params>\n\
             <param>\n<value><string>{db}</string></value>\n</param>\n\
             <param>\n<value><int>{user}</int></value>\n</param>\n\
             <param>\n<value><string>{password}</string></value>\n</param>\n\
             <param>\n<value><string>res.partner</string></value>\n</param>\n</params>\n</methodCall>\n"
        )
    }

    #[test]
    fn database_and_user_identify_never_the_password() {
        let a = identity(call("erp", "2", "secret").as_bytes());
        assert!(a.is_some());
        assert_eq!(a, identity(call("erp", "2", "other").as_bytes()));
        assert_ne!(a, identity(call("erp", "7", "secret").as_bytes()));
        assert_ne!(a, identity(call("erp2", "2", "secret").as_bytes()));
    }

    #[test]
    fn untyped_values_and_prefixes() {
        let bare = "<methodCall><methodName>login</methodName><params><param><value>erp</value></param><param><value>ap@example.com</value></param><param><value>pw";
        let typed = "<methodCall><methodName>login</methodName><params><param><value><string>erp</string></value></param><param><value><string>ap@example.com</string></value></param>";
        assert!(identity(bare.as_bytes()).is_some());
        assert_eq!(identity(bare.as_bytes()), identity(typed.as_bytes()));
        // Cut before the second parameter ends: unknown.
        assert_eq!(identity(&call("erp", "2", "s").as_bytes()[..120]), None);
        assert_eq!(identity(b"not xml at all"), None);
        assert_eq!(identity(b"{\"params\":{}}"), None);
        // The same caller over JSON-RPC has the same identity.
        let mut json = crate::jsonrpc::Scanner::new();
        json.feed(br#"{"params":{"service":"object","args":["erp",2,"pw"]}}"#);
        assert_eq!(json.identity(), identity(call("erp", "2", "pw").as_bytes()));
    }
}
