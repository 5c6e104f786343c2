package orchestrator

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/etcdworker/orchestrator/util"
)

// reservedDir is the path segment the worker keeps for its own keys (the
// delete counter and the commit tokens). A key under the prefix whose path
// holds it at any depth belongs to some worker's bookkeeping — the worker's
// own, or that of a worker on a nested prefix — so it never reaches a
// ReactorState and patches may not write it.
const reservedDir = "/__orchestrator/"

// counterName is the name of the delete counter under a reserved area.
const counterName = "delete-counter"

// keyspace owns the rules of the keys under one prefix: the watched range,
// the worker's own bookkeeping keys (the delete counter, the commit tokens),
// which keys are reserved, and which a patch may write or depend on. Every
// rule about key names lives here.
type keyspace struct {
	prefix     string // normalized: leading "/", no trailing "/"
	watchKey   string // prefix + "/": every key of the prefix starts with it
	counterKey string // the delete counter of the prefix's workers
}

func newKeyspace(p util.EtcdPrefix) keyspace {
	s := p.String()
	return keyspace{prefix: s, watchKey: p.Dir(), counterKey: s + reservedDir + counterName}
}

// checkPrefix returns an error wrapping ErrInvalidArgument when no worker or
// Source may have prefix p: it lies in a reserved area (one of its segments
// is __orchestrator), so its keys are the bookkeeping of a worker on a
// prefix above it, which it would see and might write.
func checkPrefix(p util.EtcdPrefix) error {
	if strings.Contains(p.Dir(), reservedDir) {
		return fmt.Errorf("%w: prefix %q lies in a worker's reserved area %q",
			ErrInvalidArgument, p.String(), reservedDir)
	}
	return nil
}

// tokenKey is the key of the commit token with the given random id.
func (k keyspace) tokenKey(id string) string { return k.prefix + reservedDir + "token/" + id }

// tokenKeyLen is the length of a commit token key.
func (k keyspace) tokenKeyLen() int { return len(k.tokenKey("")) + tokenIDLen }

// contains reports whether key lies under watchKey: it starts with it, as
// every key of the watched and loaded range does. watchKey itself is a key
// of the prefix too (its relative key is empty): a patch may write it, and
// the load, the watch and a Source's catch-up all pass it on.
func (k keyspace) contains(key string) bool { return strings.HasPrefix(key, k.watchKey) }

// isReserved reports whether key, which lies under the prefix, is
// bookkeeping of a worker on the prefix or on a nested one.
func (k keyspace) isReserved(key []byte) bool {
	rest := key[min(len(k.watchKey)-1, len(key)):]
	return bytes.Contains(rest, []byte(reservedDir))
}

// isCounter reports whether key is the delete counter of a worker on some
// prefix (this one or a nested one).
func isCounter(key []byte) bool {
	return bytes.HasSuffix(key, []byte(reservedDir+counterName))
}

// visible reports whether a state of a worker on this prefix sees key.
func (k keyspace) visible(key string) bool {
	return k.contains(key) && !strings.Contains(key[len(k.watchKey)-1:], reservedDir)
}

// writable returns an error when a patch may not write key.
func (k keyspace) writable(key util.EtcdKey) error {
	s := key.String()
	if !k.contains(s) {
		return errKeyOutside(s, "is not under "+k.watchKey)
	}
	return k.notReserved(s)
}

// notReserved returns an error when key, which lies under the prefix, is in
// a reserved area.
func (k keyspace) notReserved(key string) error {
	if k.isReserved([]byte(key)) {
		return errKeyOutside(key, "is in a worker's reserved area "+reservedDir)
	}
	return nil
}

// dependable returns an error when a group may not depend on d.
func (k keyspace) dependable(d groupDeps) error {
	for _, key := range d.keys {
		if err := k.writable(key); err != nil {
			return err
		}
	}
	for _, p := range d.prefixes {
		if !k.contains(p) {
			return errKeyOutside(p, "(range dependency) is not under "+k.watchKey)
		}
		if k.isReserved([]byte(p)) {
			return errKeyOutside(p, "(range dependency) is in a worker's reserved area "+reservedDir)
		}
	}
	return nil
}
