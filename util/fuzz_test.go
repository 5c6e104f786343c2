package util_test

import (
	"bytes"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// FuzzKeys checks that no function of the package panics and that the
// documented round trips hold for any key and any raw prefix.
func FuzzKeys(f *testing.F) {
	seeds := []string{
		"", "/", "//", "///", "/a", "a", "/a/", "a/", "/a/b/c", "a/b/c",
		"/a//b", "//a", "/tidb/cdc/owner/1", "/键/值", "\x00", "/\x00/\x00",
		"\xff\xfe", "/a/b/",
	}
	for _, key := range seeds {
		for _, prefix := range []string{"", "/", "/a", "a/", key} {
			f.Add(key, prefix)
		}
	}

	f.Fuzz(func(t *testing.T, s, rawPrefix string) {
		checkStringRoundTrips(t, s)
		checkHeadTail(t, s)
		checkRemovePrefix(t, s, rawPrefix)
		checkNormalizePrefix(t, s)
		checkNormalizePrefix(t, rawPrefix)
	})
}

func checkStringRoundTrips(t *testing.T, s string) {
	t.Helper()
	b := []byte(s)

	key := util.NewEtcdKey(s)
	require.Equal(t, s, key.String())
	require.Equal(t, key, util.NewEtcdKeyFromBytes(b))
	require.Equal(t, s, util.NewEtcdKeyFromBytes(b).String())
	require.True(t, bytes.Equal(b, key.Bytes()))

	relKey := util.NewEtcdRelKey(s)
	require.Equal(t, s, relKey.String())
	require.Equal(t, relKey, util.NewEtcdRelKeyFromBytes(b))
	require.True(t, bytes.Equal(b, relKey.Bytes()))
	require.Equal(t, relKey, key.AsRelKey())

	prefix := util.NewEtcdPrefix(s)
	require.Equal(t, s, prefix.String())
	require.Equal(t, prefix, util.NewEtcdPrefixFromBytes(b))
	require.True(t, bytes.Equal(b, prefix.Bytes()))
	require.Equal(t, util.NewEtcdRelPrefix(s), relKey.AsPrefix())

	relPrefix := util.NewEtcdRelPrefix(s)
	require.Equal(t, s, relPrefix.String())
	require.Equal(t, relPrefix, util.NewEtcdRelPrefixFromBytes(b))
	require.True(t, bytes.Equal(b, relPrefix.Bytes()))
	require.Equal(t, prefix, *relPrefix.AsPrefix())

	// Bytes returns a copy: scribbling on it changes nothing.
	if s != "" {
		kb := key.Bytes()
		kb[0]++
		require.Equal(t, s, key.String())
	}
}

func checkHeadTail(t *testing.T, s string) {
	t.Helper()
	key := util.NewEtcdKey(s)
	head, tail := key.Head().String(), key.Tail().String()

	// Head + Tail is the key, for every input.
	require.Equal(t, s, head+tail)

	hasSecondSegment := len(s) > 1 && strings.IndexByte(s[1:], '/') >= 0
	if hasSecondSegment {
		require.NotEmpty(t, head)
		require.True(t, strings.HasPrefix(tail, "/"), "tail %q", tail)
		require.NotContains(t, head[1:], "/")
	} else {
		require.Empty(t, head)
		require.Equal(t, s, tail)
	}

	// The other three types split the same way.
	relKey := util.NewEtcdRelKey(s)
	require.Equal(t, head, relKey.Head().String())
	require.Equal(t, tail, relKey.Tail().String())
	prefix := util.NewEtcdPrefix(s)
	require.Equal(t, head, prefix.Head().String())
	require.Equal(t, tail, prefix.Tail().String())
	relPrefix := util.NewEtcdRelPrefix(s)
	require.Equal(t, head, relPrefix.Head().String())
	require.Equal(t, tail, relPrefix.Tail().String())
}

func checkRemovePrefix(t *testing.T, s, rawPrefix string) {
	t.Helper()
	key := util.NewEtcdKey(s)

	// A raw prefix is removed byte-wise when it matches; otherwise the key
	// comes back unchanged.
	raw := util.NewEtcdPrefix(rawPrefix)
	rel := key.RemovePrefix(&raw)
	if strings.HasPrefix(s, rawPrefix) {
		require.Equal(t, key, raw.FullKey(rel))
	} else {
		require.Equal(t, key.AsRelKey(), rel)
	}
	require.Equal(t, key.AsRelKey(), key.RemovePrefix(nil))

	// The relative types remove a prefix the same way.
	relKey := util.NewEtcdRelKey(s)
	relPrefix := util.NewEtcdRelPrefix(rawPrefix)
	relRest := relKey.RemovePrefix(&relPrefix)
	require.Equal(t, rel, relRest)
	if strings.HasPrefix(s, rawPrefix) {
		require.Equal(t, s, rawPrefix+relRest.String())
	}
	require.Equal(t, relKey, relKey.RemovePrefix(nil))
	self := relKey.AsPrefix()
	require.Equal(t, util.EtcdRelKey{}, relKey.RemovePrefix(&self))

	// A key under a normalized prefix comes back from FullKey unchanged.
	norm := util.NormalizePrefix(rawPrefix)
	if strings.HasPrefix(s, norm.String()+"/") {
		rel := key.RemovePrefix(&norm)
		require.True(t, strings.HasPrefix(rel.String(), "/"))
		require.Equal(t, key, norm.FullKey(rel))
	}
	full := norm.FullKey(util.NewEtcdRelKey("/" + s))
	require.Equal(t, norm.String()+"/"+s, full.String())
	require.Equal(t, util.NewEtcdRelKey("/"+s), full.RemovePrefix(&norm))
	require.Equal(t, full, norm.FullKey(full.RemovePrefix(&norm)))
}

func checkNormalizePrefix(t *testing.T, s string) {
	t.Helper()
	norm := util.NormalizePrefix(s).String()

	require.Equal(t, norm, util.NormalizePrefix(norm).String(), "idempotent")
	require.False(t, strings.HasSuffix(norm, "/"), "%q ends with /", norm)
	require.True(t, norm == "" || strings.HasPrefix(norm, "/"), "%q", norm)

	// Nothing but a leading '/' is added and nothing but trailing '/' removed.
	trimmed := strings.TrimRight(s, "/")
	if strings.Trim(s, "/") == "" {
		require.Empty(t, norm)
	} else {
		require.True(t, strings.HasSuffix(norm, trimmed))
		require.Contains(t, []int{0, 1}, len(norm)-len(trimmed))
	}
}
