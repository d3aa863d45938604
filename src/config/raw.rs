//! The config file as written: the four objects it has (the file, an app, a HealthCheck, a
//! target written as an object) read
//! key by key, each known key's value kept as JSON, so that the validator, not serde, says what
//! is wrong with it.
//!
//! Why not `#[derive(Deserialize)]` into typed fields: serde stops at the first value of the
//! wrong type, with a message that names neither the app nor the field, and serde_json keeps
//! the last of a key given twice without a word. Here a value of any type is accepted and kept
//! (`validate` and `types` check each one, naming the app and field, and go on), a key given
//! twice is recorded, and an unknown key is recorded and its value skipped unread
//! (`IgnoredAny`, so a huge value under a misspelt key costs no memory). Only what is not JSON
//! at all (and serde_json's nesting limit of 128) stops the read.

use std::collections::HashSet;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// The file as written.
#[derive(Debug, Default)]
pub(super) struct RawConfig {
    /// Each app boxed: a `RawApp` is some 400 bytes, and a 64 MiB file can list millions of
    /// entries that are not apps at all (`[]`), each of which should cost a pointer, not that.
    pub(super) apps: Option<Shaped<Vec<Shaped<Box<RawApp>>>>>,
    pub(super) keys: Keys,
}

/// The keys of one object that are not ours, and those given more than once: each listed
/// once, in the order first seen.
#[derive(Debug, Default)]
pub(super) struct Keys {
    pub(super) unknown: Vec<String>,
    pub(super) twice: Vec<String>,
    /// Every key in either list, so that a file of a million keys costs a million look-ups,
    /// not a million squared.
    listed: HashSet<String>,
}

impl Keys {
    fn unknown(&mut self, key: String) {
        // Each unknown key once, however often it is given: one problem says it all.
        if self.listed.insert(key.clone()) {
            self.unknown.push(key);
        }
    }
    fn twice(&mut self, key: String) {
        if self.listed.insert(key.clone()) {
            self.twice.push(key);
        }
    }
}

/// One entry of `Apps`. Each field is the value as written (JSON `null` counts as absent).
#[derive(Debug, Default)]
pub(super) struct RawApp {
    pub(super) name: Option<Value>,
    /// Numbers and `"A-B"` ranges; kept as JSON so that 0, 70000 and "x" all get our message.
    pub(super) ports: Option<Value>,
    pub(super) addresses: Option<Value>,
    pub(super) hostnames: Option<Value>,
    /// Each entry `"host:port"` or an object (`RawTarget`).
    pub(super) targets: Option<Shaped<Vec<RawTargetEntry>>>,
    pub(super) health_check: Option<Shaped<RawHealthCheck>>,
    pub(super) balance: Option<Value>,
    pub(super) connect_attempts: Option<Value>,
    pub(super) max_connections: Option<Value>,
    pub(super) max_connections_per_client: Option<Value>,
    pub(super) proxy_protocol: Option<Value>,
    pub(super) keys: Keys,
}

#[derive(Debug, Default)]
pub(super) struct RawHealthCheck {
    pub(super) interval_ms: Option<Value>,
    pub(super) timeout_ms: Option<Value>,
    pub(super) fall: Option<Value>,
    pub(super) rise: Option<Value>,
    pub(super) kind: Option<Value>,
    pub(super) path: Option<Value>,
    pub(super) host: Option<Value>,
    pub(super) expect_status: Option<Value>,
    pub(super) server_name: Option<Value>,
    pub(super) keys: Keys,
}

/// One entry of `Targets`.
#[derive(Debug)]
pub(super) enum RawTargetEntry {
    /// `"host:port"`.
    Address(String),
    /// `{"Address": ..., "Weight": ...}`, boxed for the same reason apps are.
    Object(Box<RawTarget>),
    /// Anything else (null included).
    Wrong(Found),
}

/// A target written as an object.
#[derive(Debug, Default)]
pub(super) struct RawTarget {
    pub(super) address: Option<Value>,
    pub(super) weight: Option<Value>,
    pub(super) backup: Option<Value>,
    pub(super) drain: Option<Value>,
    pub(super) keys: Keys,
}

/// A place where a list or an object is wanted: what is there.
#[derive(Debug)]
pub(super) enum Shaped<T> {
    /// The list or object wanted.
    Is(T),
    /// JSON `null`: the same as leaving the key out.
    Null,
    /// Something else. A scalar is kept to be quoted in the message; a list or an object of
    /// the wrong kind is skipped unread, only its kind kept.
    Wrong(Found),
}

/// A value of the wrong kind, as a message shows it.
#[derive(Debug, Clone)]
pub(super) enum Found {
    Scalar(Value),
    List,
    Object,
}

/// The objects of the file, read key by key.
trait Object: Default {
    /// Read the value of `key` into its field; false if `key` is not one of ours (its value is
    /// then still unread). `seen` says whether the field was already set.
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        seen: &mut bool,
    ) -> Result<bool, A::Error>;
    fn keys(&mut self) -> &mut Keys;
}

/// Set `slot` to the next value, noting in `seen` whether it already held one (the last of a
/// key given twice is the one kept, as serde_json does, and the repeat is a problem).
fn put<'de, A: MapAccess<'de>, T: Deserialize<'de>>(
    slot: &mut Option<T>,
    map: &mut A,
    seen: &mut bool,
) -> Result<bool, A::Error> {
    *seen = slot.is_some();
    *slot = Some(map.next_value()?);
    Ok(true)
}

impl Object for RawConfig {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        seen: &mut bool,
    ) -> Result<bool, A::Error> {
        match key {
            "Apps" => put(&mut self.apps, map, seen),
            _ => Ok(false),
        }
    }
    fn keys(&mut self) -> &mut Keys {
        &mut self.keys
    }
}

impl Object for RawApp {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        seen: &mut bool,
    ) -> Result<bool, A::Error> {
        let slot = match key {
            "HealthCheck" => return put(&mut self.health_check, map, seen),
            "Name" => &mut self.name,
            "Ports" => &mut self.ports,
            "Addresses" => &mut self.addresses,
            "Hostnames" => &mut self.hostnames,
            "Targets" => return put(&mut self.targets, map, seen),
            "Balance" => &mut self.balance,
            "ConnectAttempts" => &mut self.connect_attempts,
            "MaxConnections" => &mut self.max_connections,
            "MaxConnectionsPerClient" => &mut self.max_connections_per_client,
            "ProxyProtocol" => &mut self.proxy_protocol,
            _ => return Ok(false),
        };
        put(slot, map, seen)
    }
    fn keys(&mut self) -> &mut Keys {
        &mut self.keys
    }
}

impl Object for RawHealthCheck {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        seen: &mut bool,
    ) -> Result<bool, A::Error> {
        let slot = match key {
            "IntervalMs" => &mut self.interval_ms,
            "TimeoutMs" => &mut self.timeout_ms,
            "Fall" => &mut self.fall,
            "Rise" => &mut self.rise,
            "Kind" => &mut self.kind,
            "Path" => &mut self.path,
            "Host" => &mut self.host,
            "ExpectStatus" => &mut self.expect_status,
            "ServerName" => &mut self.server_name,
            _ => return Ok(false),
        };
        put(slot, map, seen)
    }
    fn keys(&mut self) -> &mut Keys {
        &mut self.keys
    }
}

impl Object for RawTarget {
    fn field<'de, A: MapAccess<'de>>(
        &mut self,
        key: &str,
        map: &mut A,
        seen: &mut bool,
    ) -> Result<bool, A::Error> {
        let slot = match key {
            "Address" => &mut self.address,
            "Weight" => &mut self.weight,
            "Backup" => &mut self.backup,
            "Drain" => &mut self.drain,
            _ => return Ok(false),
        };
        put(slot, map, seen)
    }
    fn keys(&mut self) -> &mut Keys {
        &mut self.keys
    }
}

/// Read an object key by key into `T`.
fn read_object<'de, T: Object, A: MapAccess<'de>>(mut map: A) -> Result<T, A::Error> {
    let mut out = T::default();
    while let Some(key) = map.next_key::<Key<'de>>()? {
        let mut seen = false;
        if !out.field(key.as_str(), &mut map, &mut seen)? {
            map.next_value::<IgnoredAny>()?;
            out.keys().unknown(key.into_owned());
        } else if seen {
            out.keys().twice(key.into_owned());
        }
    }
    Ok(out)
}

/// A key as read: borrowed from the file when it is written without escapes (every key of a
/// config as people write it), so that matching it to a field allocates nothing (a key a
/// `String` was a tenth of the allocations of reading a config directory's file); a copy
/// only for a key with escapes, or one kept for a message.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }

    fn into_owned(self) -> String {
        match self {
            Key::Borrowed(s) => s.to_owned(),
            Key::Owned(s) => s,
        }
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Key<'de>, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// What a `Shaped<T>` wants: an object (`T: Object`) or the list of apps.
trait Wanted: Sized {
    fn map<'de, A: MapAccess<'de>>(map: A) -> Result<Shaped<Self>, A::Error> {
        skip_map(map)?;
        Ok(Shaped::Wrong(Found::Object))
    }
    fn seq<'de, A: SeqAccess<'de>>(seq: A) -> Result<Shaped<Self>, A::Error> {
        skip_seq(seq)?;
        Ok(Shaped::Wrong(Found::List))
    }
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

impl Wanted for RawConfig {
    fn map<'de, A: MapAccess<'de>>(map: A) -> Result<Shaped<Self>, A::Error> {
        read_object(map).map(Shaped::Is)
    }
}

impl Wanted for Box<RawApp> {
    fn map<'de, A: MapAccess<'de>>(map: A) -> Result<Shaped<Self>, A::Error> {
        read_object(map).map(|app| Shaped::Is(Box::new(app)))
    }
}

impl Wanted for RawHealthCheck {
    fn map<'de, A: MapAccess<'de>>(map: A) -> Result<Shaped<Self>, A::Error> {
        read_object(map).map(Shaped::Is)
    }
}

impl Wanted for Vec<Shaped<Box<RawApp>>> {
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Shaped<Self>, A::Error> {
        let mut out = Vec::new();
        while let Some(app) = seq.next_element()? {
            out.push(app);
        }
        Ok(Shaped::Is(out))
    }
}

impl Wanted for Vec<RawTargetEntry> {
    fn seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<Shaped<Self>, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = seq.next_element()? {
            out.push(entry);
        }
        Ok(Shaped::Is(out))
    }
}

/// An entry of `Targets`: a string, an object read key by key, or anything else kept (a list
/// only as its kind) for the message.
impl<'de> Deserialize<'de> for RawTargetEntry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawTargetEntry, D::Error> {
        struct EntryVisitor;
        impl<'de> Visitor<'de> for EntryVisitor {
            type Value = RawTargetEntry;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawTargetEntry, A::Error> {
                read_object(map).map(|t| RawTargetEntry::Object(Box::new(t)))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<RawTargetEntry, A::Error> {
                skip_seq(seq)?;
                Ok(RawTargetEntry::Wrong(Found::List))
            }
            fn visit_unit<E>(self) -> Result<RawTargetEntry, E> {
                Ok(RawTargetEntry::Wrong(Found::Scalar(Value::Null)))
            }
            fn visit_bool<E>(self, v: bool) -> Result<RawTargetEntry, E> {
                Ok(RawTargetEntry::Wrong(Found::Scalar(Value::Bool(v))))
            }
            fn visit_i64<E>(self, v: i64) -> Result<RawTargetEntry, E> {
                Ok(RawTargetEntry::Wrong(Found::Scalar(Value::from(v))))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawTargetEntry, E> {
                Ok(RawTargetEntry::Wrong(Found::Scalar(Value::from(v))))
            }
            fn visit_f64<E>(self, v: f64) -> Result<RawTargetEntry, E> {
                Ok(RawTargetEntry::Wrong(Found::Scalar(Value::from(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTargetEntry, E> {
                Ok(RawTargetEntry::Address(v.to_owned()))
            }
        }
        d.deserialize_any(EntryVisitor)
    }
}

impl<'de, T: Wanted> Deserialize<'de> for Shaped<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Shaped<T>, D::Error> {
        d.deserialize_any(ShapeVisitor(PhantomData))
    }
}

struct ShapeVisitor<T>(PhantomData<T>);

impl<T> ShapeVisitor<T> {
    fn scalar<E>(v: Value) -> Result<Shaped<T>, E> {
        Ok(Shaped::Wrong(Found::Scalar(v)))
    }
}

impl<'de, T: Wanted> Visitor<'de> for ShapeVisitor<T> {
    type Value = Shaped<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Shaped<T>, A::Error> {
        T::map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Shaped<T>, A::Error> {
        T::seq(seq)
    }
    fn visit_unit<E>(self) -> Result<Shaped<T>, E> {
        Ok(Shaped::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Shaped<T>, E> {
        Self::scalar(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Shaped<T>, E> {
        Self::scalar(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Shaped<T>, E> {
        Self::scalar(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Shaped<T>, E> {
        Self::scalar(Value::from(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Shaped<T>, E> {
        Self::scalar(Value::String(v.to_owned()))
    }
}
