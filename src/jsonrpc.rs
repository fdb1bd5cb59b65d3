//! A streaming reader of Odoo JSON-RPC bodies: which service (`params.service`) Odoo will
//! call, and who is calling (`params.args[0]` and `[1]`: the database and the login or uid;
//! `args[2]`, the password, is never kept).
//!
//! Odoo reads `/jsonrpc` bodies with Python's `json.loads` (UTF-8; duplicate keys: the last
//! one wins; `\uXXXX` escapes; `NaN`, `Infinity`) and calls
//! `dispatch_rpc(params["service"], ...)` with `params = dict(body["params"])`. This reader
//! follows those rules byte by byte, in pieces of any size, with memory bounded by the
//! nesting depth. A body it cannot read with certainty says [`Service::Doubt`]: whoever
//! decides treats that like the most dangerous service.

use std::hash::{Hash, Hasher};

/// Deeper nesting than this is a doubt (Python's own recursion limit is about 1000).
const MAX_DEPTH: usize = 512;
/// A service name longer than this matches no configured name.
const MAX_SERVICE: usize = 64;
/// Of the identity arguments, this many bytes are hashed.
const MAX_ARG: usize = 256;
/// Of a number or literal, this many bytes are checked; longer numbers are digits only.
const MAX_BARE: usize = 16;

/// What the body says about `params.service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Service {
    /// No `service` (or no `params`): Odoo calls nothing.
    Absent,
    /// This service, decoded (bytes; at most `MAX_SERVICE` of them are kept).
    Name(Vec<u8>, bool),
    /// Not valid JSON, not an object, `params` not an object, `service` not a string,
    /// incomplete: the caller must assume the worst.
    Doubt,
}

impl Service {
    /// Whether the call is for service `name`. A doubt is any service.
    pub fn may_be(&self, name: &str) -> bool {
        match self {
            Service::Absent => false,
            Service::Name(v, long) => !long && v.as_slice() == name.as_bytes(),
            Service::Doubt => true,
        }
    }
}

/// The bucket of an RPC caller: its database and login or uid, the same for XML-RPC and
/// JSON-RPC calls.
pub fn rpc_identity(db: &[u8], user: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    "rpc".hash(&mut h);
    db.hash(&mut h);
    user.hash(&mut h);
    h.finish()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Root,
    Params,
    Args,
    Other,
}

/// What the value about to be read is, for Odoo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    None,
    Params,
    Service,
    Args,
    Arg(usize),
}

#[derive(Debug, Clone, Copy)]
struct Frame {
    object: bool,
    role: Role,
    /// Arrays: elements before the current one.
    index: usize,
    /// Objects: what the value of the current key is.
    slot: Slot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Esc {
    No,
    Backslash,
    Hex(u8, u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Value,
    ValueOrEnd,
    Key,
    KeyOrEnd,
    Colon,
    AfterValue,
    Str { key: bool, esc: Esc },
    Bare,
    Done,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ServiceState {
    Absent,
    Name(Vec<u8>, bool),
    NotString,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Params {
    Absent,
    NotObject,
    Object {
        service: ServiceState,
        args: [Option<Vec<u8>>; 2],
    },
}

/// What is being captured from the current string or bare token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Capture {
    Nothing,
    Key,
    Service,
    Arg(usize),
}

#[derive(Debug, Clone)]
pub struct Scanner {
    st: St,
    stack: Vec<Frame>,
    root_object: Option<bool>,
    params: Params,
    capture: Capture,
    buf: Vec<u8>,
    over: bool,
    bare: Vec<u8>,
    bare_long: bool,
    bytes: u64,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner {
            st: St::Value,
            stack: Vec::new(),
            root_object: None,
            params: Params::Absent,
            capture: Capture::Nothing,
            buf: Vec::new(),
            over: false,
            bare: Vec::new(),
            bare_long: false,
            bytes: 0,
        }
    }

    /// Bytes fed so far.
    pub fn fed(&self) -> u64 {
        self.bytes
    }

    pub fn feed(&mut self, data: &[u8]) {
        self.bytes += data.len() as u64;
        for &b in data {
            if self.st == St::Failed {
                return;
            }
            self.byte(b);
        }
    }

    /// The verdict on a complete body.
    pub fn finish(&self) -> Service {
        if self.st != St::Done {
            return Service::Doubt;
        }
        self.so_far()
    }

    /// The verdict on what was read so far, as if the body ended well here. Only a
    /// complete body ([`Scanner::finish`]) is final: a later duplicate key may change it.
    pub fn so_far(&self) -> Service {
        if self.st == St::Failed || self.root_object == Some(false) {
            return Service::Doubt;
        }
        match &self.params {
            Params::Absent => Service::Absent,
            Params::NotObject => Service::Doubt,
            Params::Object { service, .. } => match service {
                ServiceState::Absent => Service::Absent,
                ServiceState::Name(n, long) => Service::Name(n.clone(), *long),
                ServiceState::NotString => Service::Doubt,
            },
        }
    }

    /// A hash of `params.args[0]` and `[1]` (database; login or uid), when both were read.
    pub fn identity(&self) -> Option<u64> {
        match &self.params {
            Params::Object {
                args: [Some(db), Some(user)],
                ..
            } => Some(rpc_identity(db, user)),
            _ => None,
        }
    }

    fn fail(&mut self) {
        self.st = St::Failed;
    }

    fn slot(&self) -> Slot {
        match self.stack.last() {
            None => Slot::None,
            Some(f) if f.object => f.slot,
            Some(f) if f.role == Role::Args && f.index < 2 => Slot::Arg(f.index),
            Some(_) => Slot::None,
        }
    }

    fn args_mut(&mut self) -> Option<&mut [Option<Vec<u8>>; 2]> {
        match &mut self.params {
            Params::Object { args, .. } => Some(args),
            _ => None,
        }
    }

    /// A value starts with byte `b` (not whitespace).
    fn start_value(&mut self, b: u8) {
        let slot = self.slot();
        let root = self.stack.is_empty();
        if root {
            self.root_object = Some(b == b'{');
        }
        match slot {
            Slot::Params if b != b'{' => self.params = Params::NotObject,
            Slot::Service if b != b'"' => {
                if let Params::Object { service, .. } = &mut self.params {
                    *service = ServiceState::NotString;
                }
            }
            Slot::Args => {
                if let Some(args) = self.args_mut() {
                    *args = [None, None];
                }
            }
            Slot::Arg(i) => {
                if let Some(args) = self.args_mut() {
                    args[i] = None;
                }
            }
            _ => {}
        }
        match b {
            b'{' | b'[' => {
                if self.stack.len() >= MAX_DEPTH {
                    return self.fail();
                }
                let role = match (b, slot) {
                    (b'{', _) if root => Role::Root,
                    (b'{', Slot::Params) => {
                        self.params = Params::Object {
                            service: ServiceState::Absent,
                            args: [None, None],
                        };
                        Role::Params
                    }
                    (b'[', Slot::Args) => Role::Args,
                    _ => Role::Other,
                };
                let object = b == b'{';
                self.stack.push(Frame {
                    object,
                    role,
                    index: 0,
                    slot: Slot::None,
                });
                self.st = if object { St::KeyOrEnd } else { St::ValueOrEnd };
            }
            b'"' => {
                self.capture = match slot {
                    Slot::Service => Capture::Service,
                    Slot::Arg(i) => Capture::Arg(i),
                    _ => Capture::Nothing,
                };
                self.buf.clear();
                self.over = false;
                self.st = St::Str {
                    key: false,
                    esc: Esc::No,
                };
            }
            b'-' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z' => {
                self.capture = match slot {
                    Slot::Arg(i) => Capture::Arg(i),
                    _ => Capture::Nothing,
                };
                self.buf.clear();
                self.over = false;
                self.bare.clear();
                self.bare_long = false;
                self.st = St::Bare;
                self.bare_byte(b);
            }
            _ => self.fail(),
        }
    }

    fn push_captured(&mut self, bytes: &[u8]) {
        if self.capture == Capture::Nothing {
            return;
        }
        let max = match self.capture {
            Capture::Arg(_) => MAX_ARG,
            _ => MAX_SERVICE,
        };
        for &b in bytes {
            if self.buf.len() < max {
                self.buf.push(b);
            } else {
                self.over = true;
            }
        }
    }

    fn push_char(&mut self, cp: u32) {
        let c = char::from_u32(cp).unwrap_or(char::REPLACEMENT_CHARACTER);
        let mut tmp = [0u8; 4];
        self.push_captured(c.encode_utf8(&mut tmp).as_bytes());
    }

    /// A value (scalar or container) ended.
    fn value_done(&mut self) {
        self.st = if self.stack.is_empty() {
            St::Done
        } else {
            St::AfterValue
        };
    }

    fn string_done(&mut self, key: bool) {
        let captured = std::mem::take(&mut self.buf);
        let over = self.over;
        if key {
            if let Some(top) = self.stack.last_mut() {
                top.slot = match (top.role, captured.as_slice(), over) {
                    (Role::Root, b"params", false) => Slot::Params,
                    (Role::Params, b"service", false) => Slot::Service,
                    (Role::Params, b"args", false) => Slot::Args,
                    _ => Slot::None,
                };
            }
            self.st = St::Colon;
            return;
        }
        match self.capture {
            Capture::Service => {
                if let Params::Object { service, .. } = &mut self.params {
                    *service = ServiceState::Name(captured, over);
                }
            }
            Capture::Arg(i) => {
                if let Some(args) = self.args_mut() {
                    args[i] = Some(captured);
                }
            }
            _ => {}
        }
        self.capture = Capture::Nothing;
        self.value_done();
    }

    fn bare_byte(&mut self, b: u8) {
        if self.bare.len() < MAX_BARE {
            self.bare.push(b);
        } else {
            self.bare_long = true;
            if !(b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-')) {
                return self.fail();
            }
        }
        if let Capture::Arg(_) = self.capture {
            self.push_captured(&[b]);
        }
    }

    fn bare_done(&mut self) {
        let t = self.bare.as_slice();
        let literal = matches!(
            t,
            b"true" | b"false" | b"null" | b"NaN" | b"Infinity" | b"-Infinity"
        );
        let number = !t.is_empty()
            && (t[0] == b'-' || t[0].is_ascii_digit())
            && t.iter()
                .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'+' | b'-'))
            && t.iter().any(|b| b.is_ascii_digit());
        if !(literal && !self.bare_long || number) {
            return self.fail();
        }
        if let Capture::Arg(i) = self.capture {
            let captured = std::mem::take(&mut self.buf);
            if let Some(args) = self.args_mut() {
                args[i] = Some(captured);
            }
        }
        self.capture = Capture::Nothing;
        self.value_done();
    }

    fn close(&mut self, b: u8) {
        match self.stack.last() {
            Some(f) if f.object == (b == b'}') => {
                self.stack.pop();
                self.value_done();
            }
            _ => self.fail(),
        }
    }

    fn byte(&mut self, b: u8) {
        match self.st {
            St::Failed => {}
            St::Value | St::ValueOrEnd => {
                if is_ws(b) {
                } else if b == b']' && self.st == St::ValueOrEnd {
                    self.close(b);
                } else {
                    self.start_value(b);
                }
            }
            St::KeyOrEnd | St::Key => {
                if is_ws(b) {
                } else if b == b'}' && self.st == St::KeyOrEnd {
                    self.close(b);
                } else if b == b'"' {
                    let role = self.stack.last().map_or(Role::Other, |f| f.role);
                    self.capture = if matches!(role, Role::Root | Role::Params) {
                        Capture::Key
                    } else {
                        Capture::Nothing
                    };
                    self.buf.clear();
                    self.over = false;
                    self.st = St::Str {
                        key: true,
                        esc: Esc::No,
                    };
                } else {
                    self.fail();
                }
            }
            St::Colon => {
                if is_ws(b) {
                } else if b == b':' {
                    self.st = St::Value;
                } else {
                    self.fail();
                }
            }
            St::AfterValue => {
                if is_ws(b) {
                    return;
                }
                match (b, self.stack.last_mut()) {
                    (b',', Some(f)) if f.object => {
                        f.slot = Slot::None;
                        self.st = St::Key;
                    }
                    (b',', Some(f)) => {
                        f.index += 1;
                        self.st = St::Value;
                    }
                    (b'}' | b']', Some(_)) => self.close(b),
                    _ => self.fail(),
                }
            }
            St::Str { key, esc } => match esc {
                Esc::No => match b {
                    b'"' => self.string_done(key),
                    b'\\' => {
                        self.st = St::Str {
                            key,
                            esc: Esc::Backslash,
                        }
                    }
                    0..=0x1f => self.fail(),
                    _ => self.push_captured(&[b]),
                },
                Esc::Backslash => {
                    let decoded = match b {
                        b'"' => b'"',
                        b'\\' => b'\\',
                        b'/' => b'/',
                        b'b' => 0x08,
                        b'f' => 0x0c,
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        b'u' => {
                            self.st = St::Str {
                                key,
                                esc: Esc::Hex(0, 0),
                            };
                            return;
                        }
                        _ => return self.fail(),
                    };
                    self.push_captured(&[decoded]);
                    self.st = St::Str { key, esc: Esc::No };
                }
                Esc::Hex(n, acc) => {
                    let Some(d) = (b as char).to_digit(16) else {
                        return self.fail();
                    };
                    let acc = acc * 16 + d;
                    if n == 3 {
                        self.push_char(acc);
                        self.st = St::Str { key, esc: Esc::No };
                    } else {
                        self.st = St::Str {
                            key,
                            esc: Esc::Hex(n + 1, acc),
                        };
                    }
                }
            },
            St::Bare => {
                if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.') {
                    self.bare_byte(b);
                } else if is_ws(b) || matches!(b, b',' | b']' | b'}') {
                    self.bare_done();
                    if self.st != St::Failed {
                        self.byte(b);
                    }
                } else {
                    self.fail();
                }
            }
            St::Done => {
                if !is_ws(b) {
                    self.fail();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
