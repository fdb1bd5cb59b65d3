//! The file form of the configuration: a serde mirror of the TOML the operator writes.
//!
//! Every key is optional here and every leaf keeps its span, so that `compile` can report
//! all missing or invalid values at once with their line and column. Values with units
//! (durations, sizes, addresses, CIDRs) stay strings until `compile` parses them.

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;
use toml::Spanned;

pub type Str = Spanned<String>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<Spanned<Listen>>,
    pub network: Option<Network>,
    pub server: Option<Server>,
    pub log: Option<Log>,
    pub pools: Option<Spanned<Named<Spanned<Pool>>>>,
    pub audit: Option<Audit>,
    pub tls: Option<Spanned<Tls>>,
    pub maintenance: Option<Spanned<Maintenance>>,
    pub class: Option<Vec<Spanned<Class>>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Maintenance {
    pub enabled: Option<bool>,
    pub windows: Option<Vec<Spanned<Window>>>,
    pub page: Option<Str>,
    pub allow: Option<Vec<Str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    pub start: Option<Str>,
    pub end: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub certificates: Option<Spanned<Vec<Spanned<CertEntry>>>>,
    pub min_version: Option<Str>,
    pub redirect_http: Option<bool>,
    pub redirect_port: Option<Spanned<i64>>,
    pub redirect_exempt: Option<Vec<Str>>,
    pub hsts: Option<Str>,
    pub client_ca: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEntry {
    pub cert: Option<Str>,
    pub key: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub http: Option<Spanned<Vec<Str>>>,
    pub https: Option<Spanned<Vec<Str>>>,
    pub admin: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub zone: Option<Str>,
    pub trusted_proxies: Option<Vec<Str>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub threads: Option<Spanned<i64>>,
    pub grace_period: Option<Str>,
    pub shutdown_timeout: Option<Str>,
    pub upgrade_sock: Option<Str>,
    pub max_request_header: Option<Str>,
    pub keepalive_timeout: Option<Str>,
    pub pin_threads: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    pub format: Option<Str>,
    pub level: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    pub path: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub servers: Option<Spanned<Vec<Spanned<ServerEntry>>>>,
    pub health_check: Option<Spanned<HealthCheck>>,
    pub balance: Option<Str>,
    pub failover_zones: Option<Vec<Str>>,
    pub host: Option<Str>,
    pub max_attempts: Option<Spanned<i64>>,
    pub resolve_interval: Option<Str>,
    pub affinity: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: Option<Str>,
    pub tcp: Option<bool>,
    pub status: Option<Spanned<i64>>,
    pub interval: Option<Str>,
    pub timeout: Option<Str>,
    pub healthy_after: Option<Spanned<i64>>,
    pub unhealthy_after: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    pub address: Option<Str>,
    pub zone: Option<Str>,
    pub drain: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Class {
    pub name: Option<Str>,
    #[serde(rename = "match")]
    pub matches: Option<Spanned<Alternatives>>,
    pub pool: Option<Str>,
    pub timeouts: Option<Spanned<Timeouts>>,
    pub max_body: Option<Str>,
    pub allow: Option<Vec<Str>>,
    pub max_in_flight: Option<Spanned<i64>>,
    pub audit: Option<bool>,
    pub rate_limit: Option<Spanned<RateLimit>>,
    pub security_headers: Option<Spanned<SecurityHeaders>>,
    pub retry_idempotent: Option<bool>,
    pub require_client_cert: Option<bool>,
    pub maintenance: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityHeaders {
    pub hsts: Option<Str>,
    pub nosniff: Option<bool>,
    pub referrer_policy: Option<Str>,
    pub secure_session_cookie: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub key: Option<Str>,
    pub rate: Option<Str>,
    pub burst: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    pub connect: Option<Str>,
    pub read: Option<Str>,
    pub idle: Option<Str>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub path: Option<Str>,
    pub path_prefix: Option<Str>,
    pub method: Option<Spanned<OneOrMany<String>>>,
    pub host: Option<Str>,
    pub header: Option<Str>,
    pub value_prefix: Option<Str>,
    pub jsonrpc_service: Option<Str>,
}

/// `match = [{ ... }, { ... }]` or a single `match = { ... }`. A single table's span is not
/// known here (serde's map adapter hides it): it is `0..0`, and `compile` uses the span of
/// the whole `match` value instead.
#[derive(Debug)]
pub struct Alternatives(pub Vec<Spanned<Match>>);

impl<'de> Deserialize<'de> for Alternatives {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Alternatives;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table or an array of tables")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(Alternatives)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let m = Match::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(Alternatives(vec![Spanned::new(0..0, m)]))
            }
        }
        d.deserialize_any(V)
    }
}

/// A key that takes one value or a list of them: `method = "GET"` or `method = ["GET", "HEAD"]`.
#[derive(Debug)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a value or an array of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(de::value::SeqAccessDeserializer::new(seq)).map(OneOrMany)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                T::deserialize(de::value::StrDeserializer::<E>::new(s)).map(|v| OneOrMany(vec![v]))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A TOML table of named sub-tables (`[pools.web]`), in file order, each name with its span.
#[derive(Debug)]
pub struct Named<T>(pub Vec<(Str, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Named<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Named<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a table of named tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<Str>()? {
                    out.push((key, map.next_value::<T>()?));
                }
                Ok(Named(out))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}
