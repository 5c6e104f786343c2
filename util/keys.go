// Package util provides small, typed wrappers around etcd key strings.
//
// The EtcdWorker deals with four kinds of strings that are easy to mix up:
//
//   - EtcdKey: a complete key as stored in etcd, e.g. "/tidb/cdc/owner".
//   - EtcdPrefix: the leading part of a complete key, e.g. "/tidb/cdc".
//   - EtcdRelKey: what is left of a key once a prefix is removed, e.g.
//     "/owner".
//   - EtcdRelPrefix: the leading part of a relative key.
//
// Keys are split into segments at '/'. A key is expected to start with '/',
// so "/a/b/c" has the segments "/a", "/b" and "/c". Head returns the first
// segment and Tail everything from the second '/' on; for every input,
// Head().String() + Tail().String() == String().
//
// All four types are small comparable values (a single string field), so they
// can be compared with == and used as map keys. The zero value of each type
// is the empty key or prefix. No function or method in this package panics,
// whatever the input.
package util

import "strings"

// EtcdKey is a complete key in etcd. It is comparable and can be used as a
// map key; its zero value is the empty key.
type EtcdKey struct {
	keyStr string
}

// NewEtcdKey returns the EtcdKey for key. The string is used as is: no
// validation or normalization takes place.
func NewEtcdKey(key string) EtcdKey {
	return EtcdKey{keyStr: key}
}

// NewEtcdKeyFromBytes returns the EtcdKey for key. It copies key once (one
// string conversion), so the caller may reuse the slice afterwards.
func NewEtcdKeyFromBytes(key []byte) EtcdKey {
	return EtcdKey{keyStr: string(key)}
}

// String returns the key as a string.
func (k EtcdKey) String() string {
	return k.keyStr
}

// Bytes returns the key as a newly allocated byte slice that the caller may
// modify.
func (k EtcdKey) Bytes() []byte {
	return []byte(k.keyStr)
}

// Head returns the first segment of the key as a prefix: for "/a/b/c" it is
// "/a". The key is split at its first '/' after the first byte. When there is
// no such '/' (the key is empty, "/" or has a single segment such as "/a"),
// Head returns the empty prefix and Tail returns the whole key.
func (k EtcdKey) Head() EtcdPrefix {
	head, _ := splitHead(k.keyStr)
	return EtcdPrefix{prefixStr: head}
}

// Tail returns the key without its first segment: for "/a/b/c" it is "/b/c".
// When the key has no second segment (it is empty, "/" or such as "/a"), Tail
// returns the whole key unchanged, as a relative key. See Head.
func (k EtcdKey) Tail() EtcdRelKey {
	_, tail := splitHead(k.keyStr)
	return EtcdRelKey{keyStr: tail}
}

// RemovePrefix returns the key with prefix removed from its beginning: for the
// key "/p/a/b" and the prefix "/p" it is "/a/b". The match is byte-wise, as
// with strings.TrimPrefix, and not aligned to segments: "/p" also removes from
// "/pq/a", leaving "q/a". When the key does not start with prefix, or prefix
// is nil or empty, the whole key is returned unchanged, as a relative key.
func (k EtcdKey) RemovePrefix(prefix *EtcdPrefix) EtcdRelKey {
	if prefix == nil {
		return EtcdRelKey(k)
	}
	return EtcdRelKey{keyStr: strings.TrimPrefix(k.keyStr, prefix.prefixStr)}
}

// AsRelKey returns the same string as a relative key.
func (k EtcdKey) AsRelKey() EtcdRelKey {
	return EtcdRelKey(k)
}

// EtcdRelKey is a key relative to some prefix, i.e. the suffix of a complete
// key. It is comparable; its zero value is the empty relative key.
type EtcdRelKey struct {
	keyStr string
}

// NewEtcdRelKey returns the EtcdRelKey for key. The string is used as is.
func NewEtcdRelKey(key string) EtcdRelKey {
	return EtcdRelKey{keyStr: key}
}

// NewEtcdRelKeyFromBytes returns the EtcdRelKey for key. It copies key once.
func NewEtcdRelKeyFromBytes(key []byte) EtcdRelKey {
	return EtcdRelKey{keyStr: string(key)}
}

// String returns the relative key as a string.
func (k EtcdRelKey) String() string {
	return k.keyStr
}

// Bytes returns the relative key as a newly allocated byte slice.
func (k EtcdRelKey) Bytes() []byte {
	return []byte(k.keyStr)
}

// Head returns the first segment of the relative key: for "/a/b/c" it is
// "/a". When there is no second segment (the key is empty, "/" or such as
// "/a"), Head returns the empty relative prefix. See EtcdKey.Head.
func (k EtcdRelKey) Head() EtcdRelPrefix {
	head, _ := splitHead(k.keyStr)
	return EtcdRelPrefix{prefixStr: head}
}

// Tail returns the relative key without its first segment: for "/a/b/c" it
// is "/b/c". When there is no second segment (the key is empty, "/" or such
// as "/a"), Tail returns the whole key unchanged. See EtcdKey.Tail.
func (k EtcdRelKey) Tail() EtcdRelKey {
	_, tail := splitHead(k.keyStr)
	return EtcdRelKey{keyStr: tail}
}

// AsPrefix returns the same string as a relative prefix: for "/a/b" it is
// the relative prefix "/a/b". The string is used as is, so the zero relative
// key gives the empty relative prefix.
func (k EtcdRelKey) AsPrefix() EtcdRelPrefix {
	return EtcdRelPrefix{prefixStr: k.keyStr}
}

// RemovePrefix returns the relative key with prefix removed from its
// beginning: for the relative key "/a/b/c" and the relative prefix "/a" it is
// "/b/c". As with EtcdKey.RemovePrefix, the match is byte-wise and not
// aligned to segments. When the key does not start with prefix, or prefix is
// nil or empty, the key is returned unchanged.
func (k EtcdRelKey) RemovePrefix(prefix *EtcdRelPrefix) EtcdRelKey {
	if prefix == nil {
		return k
	}
	return EtcdRelKey{keyStr: strings.TrimPrefix(k.keyStr, prefix.prefixStr)}
}

// EtcdPrefix is the leading part of complete keys, such as the prefix an
// EtcdWorker watches. Use NormalizePrefix to build one from user input. It is
// comparable; its zero value is the empty prefix.
type EtcdPrefix struct {
	prefixStr string
}

// NewEtcdPrefix returns the EtcdPrefix for prefix, used as is. Use
// NormalizePrefix to get the canonical form.
func NewEtcdPrefix(prefix string) EtcdPrefix {
	return EtcdPrefix{prefixStr: prefix}
}

// NewEtcdPrefixFromBytes returns the EtcdPrefix for prefix, used as is. It
// copies prefix once.
func NewEtcdPrefixFromBytes(prefix []byte) EtcdPrefix {
	return EtcdPrefix{prefixStr: string(prefix)}
}

// String returns the prefix as a string.
func (p EtcdPrefix) String() string {
	return p.prefixStr
}

// Bytes returns the prefix as a newly allocated byte slice.
func (p EtcdPrefix) Bytes() []byte {
	return []byte(p.prefixStr)
}

// Dir returns the prefix followed by "/": the keys under a normalized
// prefix p are those that start with p.Dir(), p.Dir() itself included (a
// worker on p sees those of them outside the workers' reserved areas).
func (p EtcdPrefix) Dir() string {
	return p.prefixStr + "/"
}

// Head returns the first segment of the prefix: for "/a/b" it is "/a". When
// there is no second segment (the prefix is empty, "/" or such as "/a"), Head
// returns the empty prefix. See EtcdKey.Head.
func (p EtcdPrefix) Head() EtcdPrefix {
	head, _ := splitHead(p.prefixStr)
	return EtcdPrefix{prefixStr: head}
}

// Tail returns the prefix without its first segment: for "/a/b" it is "/b".
// When there is no second segment (the prefix is empty, "/" or such as "/a"),
// Tail returns the whole prefix unchanged, as a relative prefix. See
// EtcdKey.Tail.
func (p EtcdPrefix) Tail() EtcdRelPrefix {
	_, tail := splitHead(p.prefixStr)
	return EtcdRelPrefix{prefixStr: tail}
}

// FullKey returns the complete key made of the prefix followed by key. It is
// a plain concatenation: no '/' is added or removed, so for a normalized
// prefix the relative key should start with '/'. For every key and prefix p,
// p.FullKey(key.RemovePrefix(&p)) == key when key starts with p.
func (p EtcdPrefix) FullKey(key EtcdRelKey) EtcdKey {
	return EtcdKey{keyStr: p.prefixStr + key.keyStr}
}

// EtcdRelPrefix is the leading part of relative keys. It is comparable; its
// zero value is the empty relative prefix.
type EtcdRelPrefix struct {
	prefixStr string
}

// NewEtcdRelPrefix returns the EtcdRelPrefix for prefix, used as is.
func NewEtcdRelPrefix(prefix string) EtcdRelPrefix {
	return EtcdRelPrefix{prefixStr: prefix}
}

// NewEtcdRelPrefixFromBytes returns the EtcdRelPrefix for prefix, used as is.
// It copies prefix once.
func NewEtcdRelPrefixFromBytes(prefix []byte) EtcdRelPrefix {
	return EtcdRelPrefix{prefixStr: string(prefix)}
}

// String returns the relative prefix as a string.
func (p EtcdRelPrefix) String() string {
	return p.prefixStr
}

// Bytes returns the relative prefix as a newly allocated byte slice.
func (p EtcdRelPrefix) Bytes() []byte {
	return []byte(p.prefixStr)
}

// Head returns the first segment of the relative prefix: for "/a/b" it is
// "/a". When there is no second segment (the prefix is empty, "/" or such as
// "/a"), Head returns the empty relative prefix. See EtcdKey.Head.
func (p EtcdRelPrefix) Head() EtcdRelPrefix {
	head, _ := splitHead(p.prefixStr)
	return EtcdRelPrefix{prefixStr: head}
}

// Tail returns the relative prefix without its first segment: for "/a/b" it
// is "/b". When there is no second segment (the prefix is empty, "/" or such
// as "/a"), Tail returns the whole relative prefix unchanged. See
// EtcdKey.Tail.
func (p EtcdRelPrefix) Tail() EtcdRelPrefix {
	_, tail := splitHead(p.prefixStr)
	return EtcdRelPrefix{prefixStr: tail}
}

// AsPrefix returns the same string as a new EtcdPrefix, for instance to pass
// it to EtcdKey.RemovePrefix.
func (p EtcdRelPrefix) AsPrefix() *EtcdPrefix {
	return &EtcdPrefix{prefixStr: p.prefixStr}
}

// NormalizePrefix returns prefix in canonical form: it adds a leading '/' if
// prefix does not start with one, then removes every trailing '/'. The result
// is therefore either empty or starts with '/' and does not end with '/', so
// that result + "/" + name is a well-formed key. Both "" and "/" (and any
// string made only of '/') normalize to the empty prefix; "a/" and "/a//"
// normalize to "/a". NormalizePrefix is idempotent.
func NormalizePrefix(prefix string) EtcdPrefix {
	if !strings.HasPrefix(prefix, "/") {
		prefix = "/" + prefix
	}
	return EtcdPrefix{prefixStr: strings.TrimRight(prefix, "/")}
}

// splitHead splits s at its first '/' after the first byte: s[:i] is the
// head and s[i:] the tail. When s has no such '/', the head is empty and the
// tail is s. head+tail == s always holds.
func splitHead(s string) (head, tail string) {
	if len(s) < 2 {
		return "", s
	}
	i := strings.IndexByte(s[1:], '/')
	if i < 0 {
		return "", s
	}
	return s[:i+1], s[i+1:]
}
