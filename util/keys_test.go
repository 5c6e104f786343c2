package util_test

import (
	"fmt"
	"slices"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator/util"
)

// splitCases covers Head and Tail. They are shared by the four types, which
// split their strings the same way.
var splitCases = []struct {
	name string
	in   string
	head string
	tail string
}{
	{name: "three segments", in: "/a/b/c", head: "/a", tail: "/b/c"},
	{name: "two segments", in: "/a/b", head: "/a", tail: "/b"},
	{name: "long segments", in: "/tidb/cdc/owner/123", head: "/tidb", tail: "/cdc/owner/123"},
	{name: "trailing slash", in: "/a/", head: "/a", tail: "/"},
	{name: "empty second segment", in: "/a//b", head: "/a", tail: "//b"},
	{name: "double leading slash", in: "//a", head: "/", tail: "/a"},
	{name: "only slashes", in: "//", head: "/", tail: "/"},
	{name: "no leading slash", in: "a/b/c", head: "a", tail: "/b/c"},
	{name: "unicode", in: "/键/值", head: "/键", tail: "/值"},
	{name: "NUL byte", in: "/\x00/\x00", head: "/\x00", tail: "/\x00"},
	// No second segment: Head is empty, Tail is the whole input.
	{name: "empty", in: "", head: "", tail: ""},
	{name: "root", in: "/", head: "", tail: "/"},
	{name: "single segment", in: "/a", head: "", tail: "/a"},
	{name: "single segment without slash", in: "a", head: "", tail: "a"},
	{name: "single byte", in: "x", head: "", tail: "x"},
}

// TestHeadTailOfEveryType: the four types split the same strings alike, and
// a key's head and tail put together give back the key.
func TestHeadTailOfEveryType(t *testing.T) {
	t.Parallel()
	for _, tc := range splitCases {
		t.Run(tc.name, func(t *testing.T) {
			key := util.NewEtcdKey(tc.in)
			requireHeadTail(t, key, util.NewEtcdPrefix(tc.head), util.NewEtcdRelKey(tc.tail))
			require.Equal(t, tc.in, key.Head().String()+key.Tail().String())
			requireHeadTail(t, util.NewEtcdRelKey(tc.in), util.NewEtcdRelPrefix(tc.head), util.NewEtcdRelKey(tc.tail))
			requireHeadTail(t, util.NewEtcdPrefix(tc.in), util.NewEtcdPrefix(tc.head), util.NewEtcdRelPrefix(tc.tail))
			requireHeadTail(t, util.NewEtcdRelPrefix(tc.in), util.NewEtcdRelPrefix(tc.head), util.NewEtcdRelPrefix(tc.tail))
		})
	}
}

// requireHeadTail checks that k splits into head and tail.
func requireHeadTail[H, T any, K interface {
	Head() H
	Tail() T
}](t *testing.T, k K, head H, tail T) {
	t.Helper()
	require.Equal(t, head, k.Head())
	require.Equal(t, tail, k.Tail())
}

func TestHeadTailWalk(t *testing.T) {
	t.Parallel()
	// Repeatedly taking the tail of a key visits each segment in turn.
	key := util.NewEtcdKey("/a/b/c")
	var segments []string
	rel := key.AsRelKey()
	for rel.Head().String() != "" {
		segments = append(segments, rel.Head().String())
		rel = rel.Tail()
	}
	segments = append(segments, rel.String())
	require.Equal(t, []string{"/a", "/b", "/c"}, segments)
}

// removePrefixCase is a case of TestRemovePrefix and TestRelKeyRemovePrefix:
// removing prefix from key leaves want.
type removePrefixCase struct {
	name   string
	key    string
	prefix string
	want   string
}

// removePrefixCases hold for complete and relative keys alike.
var removePrefixCases = []removePrefixCase{
	{name: "matching prefix", key: "/p/a/b", prefix: "/p", want: "/a/b"},
	{name: "prefix with trailing slash", key: "/p/a/b", prefix: "/p/", want: "a/b"},
	{name: "empty prefix", key: "/p/a", prefix: "", want: "/p/a"},
	{name: "prefix equals key", key: "/p", prefix: "/p", want: ""},
	{name: "prefix longer than key", key: "/p", prefix: "/p/a", want: "/p"},
	{name: "not a prefix", key: "/q/a", prefix: "/p", want: "/q/a"},
	{name: "byte-wise, not segment-aligned", key: "/pq/a", prefix: "/p", want: "q/a"},
	{name: "empty key", key: "", prefix: "/p", want: ""},
	{name: "both empty", key: "", prefix: "", want: ""},
}

func TestRemovePrefix(t *testing.T) {
	t.Parallel()
	for _, tc := range removePrefixCases {
		t.Run(tc.name, func(t *testing.T) {
			key := util.NewEtcdKey(tc.key)
			prefix := util.NewEtcdPrefix(tc.prefix)
			require.Equal(t, util.NewEtcdRelKey(tc.want), key.RemovePrefix(&prefix))
		})
	}
}

func TestRemovePrefixNil(t *testing.T) {
	t.Parallel()
	key := util.NewEtcdKey("/p/a")
	require.Equal(t, key.AsRelKey(), key.RemovePrefix(nil))
}

func TestRelKeyRemovePrefix(t *testing.T) {
	t.Parallel()
	cases := append(slices.Clone(removePrefixCases),
		removePrefixCase{name: "invalid UTF-8", key: "/\xff/\xfe", prefix: "/\xff", want: "/\xfe"})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			key := util.NewEtcdRelKey(tc.key)
			prefix := util.NewEtcdRelPrefix(tc.prefix)
			require.Equal(t, util.NewEtcdRelKey(tc.want), key.RemovePrefix(&prefix))
			// Same result as removing the prefix from the complete key.
			require.Equal(t, key.RemovePrefix(&prefix),
				util.NewEtcdKey(tc.key).RemovePrefix(prefix.AsPrefix()))
		})
	}
}

func TestRelKeyRemovePrefixNil(t *testing.T) {
	t.Parallel()
	key := util.NewEtcdRelKey("/a/b")
	require.Equal(t, key, key.RemovePrefix(nil))
}

func TestRelKeyAsPrefixWalksSegments(t *testing.T) {
	t.Parallel()
	// A relative key used as a relative prefix strips itself from a longer
	// relative key: "/a/b" off "/a/b/c" leaves "/c".
	rel := util.NewEtcdRelKey("/a/b")
	prefix := rel.AsPrefix()
	require.Equal(t, "/a/b", prefix.String())
	require.Equal(t, util.NewEtcdRelKey("/c"), util.NewEtcdRelKey("/a/b/c").RemovePrefix(&prefix))
	require.Equal(t, util.NewEtcdRelKey(""), rel.RemovePrefix(&prefix))
}

func TestFullKey(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		prefix string
		rel    string
		want   string
	}{
		{name: "normalized prefix", prefix: "/p", rel: "/a/b", want: "/p/a/b"},
		{name: "empty prefix", prefix: "", rel: "/a", want: "/a"},
		{name: "empty rel key", prefix: "/p", rel: "", want: "/p"},
		{name: "plain concatenation", prefix: "/p", rel: "a", want: "/pa"},
		{name: "no slash is collapsed", prefix: "/p/", rel: "/a", want: "/p//a"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			prefix := util.NewEtcdPrefix(tc.prefix)
			full := prefix.FullKey(util.NewEtcdRelKey(tc.rel))
			require.Equal(t, util.NewEtcdKey(tc.want), full)
			require.Equal(t, util.NewEtcdRelKey(tc.rel), full.RemovePrefix(&prefix))
		})
	}
}

func TestNormalizePrefix(t *testing.T) {
	t.Parallel()
	cases := []struct {
		in   string
		want string
	}{
		{in: "", want: ""},
		{in: "/", want: ""},
		{in: "//", want: ""},
		{in: "///", want: ""},
		{in: "a", want: "/a"},
		{in: "/a", want: "/a"},
		{in: "a/", want: "/a"},
		{in: "/a/", want: "/a"},
		{in: "/a//", want: "/a"},
		{in: "/a/b", want: "/a/b"},
		{in: "a/b/", want: "/a/b"},
		{in: "//a", want: "//a"},
		{in: "/a//b", want: "/a//b"},
		{in: "键", want: "/键"},
		{in: "\x00", want: "/\x00"},
	}
	for _, tc := range cases {
		t.Run(fmt.Sprintf("%q", tc.in), func(t *testing.T) {
			got := util.NormalizePrefix(tc.in)
			require.Equal(t, util.NewEtcdPrefix(tc.want), got)
			require.Equal(t, got, util.NormalizePrefix(got.String()), "idempotent")
		})
	}
}

func TestConversions(t *testing.T) {
	t.Parallel()
	const s = "/a/b"
	require.Equal(t, util.NewEtcdRelKey(s), util.NewEtcdKey(s).AsRelKey())
	require.Equal(t, util.NewEtcdRelPrefix(s), util.NewEtcdRelKey(s).AsPrefix())
	require.Equal(t, util.NewEtcdPrefix(s), *util.NewEtcdRelPrefix(s).AsPrefix())

	// AsPrefix returns a fresh pointer each time: changing one value does
	// not change the relative prefix or later results.
	rel := util.NewEtcdRelPrefix(s)
	p := rel.AsPrefix()
	*p = util.NewEtcdPrefix("/other")
	require.Equal(t, s, rel.String())
	require.Equal(t, s, rel.AsPrefix().String())
}

func TestStringAndBytes(t *testing.T) {
	t.Parallel()
	inputs := []string{"", "/", "/a/b/c", "键", "\x00\xff"}
	for _, in := range inputs {
		t.Run(fmt.Sprintf("%q", in), func(t *testing.T) {
			b := []byte(in)
			values := []interface {
				String() string
				Bytes() []byte
			}{
				util.NewEtcdKey(in), util.NewEtcdKeyFromBytes(b),
				util.NewEtcdRelKey(in), util.NewEtcdRelKeyFromBytes(b),
				util.NewEtcdPrefix(in), util.NewEtcdPrefixFromBytes(b),
				util.NewEtcdRelPrefix(in), util.NewEtcdRelPrefixFromBytes(b),
			}
			for _, v := range values {
				require.Equal(t, in, v.String())
				require.Equal(t, in, string(v.Bytes()))
			}
		})
	}
}

func TestFromBytesCopies(t *testing.T) {
	t.Parallel()
	b := []byte("/a/b")
	key := util.NewEtcdKeyFromBytes(b)
	relKey := util.NewEtcdRelKeyFromBytes(b)
	prefix := util.NewEtcdPrefixFromBytes(b)
	relPrefix := util.NewEtcdRelPrefixFromBytes(b)
	b[1] = 'x'
	require.Equal(t, "/a/b", key.String())
	require.Equal(t, "/a/b", relKey.String())
	require.Equal(t, "/a/b", prefix.String())
	require.Equal(t, "/a/b", relPrefix.String())
}

func TestBytesReturnsFreshSlice(t *testing.T) {
	t.Parallel()
	key := util.NewEtcdKey("/a/b")
	b := key.Bytes()
	b[1] = 'x'
	require.Equal(t, "/a/b", key.String())
	require.Equal(t, "/a/b", string(key.Bytes()))

	relKey := util.NewEtcdRelKey("/a")
	relKey.Bytes()[0] = 'x'
	require.Equal(t, "/a", relKey.String())

	prefix := util.NewEtcdPrefix("/a")
	prefix.Bytes()[0] = 'x'
	require.Equal(t, "/a", prefix.String())

	relPrefix := util.NewEtcdRelPrefix("/a")
	relPrefix.Bytes()[0] = 'x'
	require.Equal(t, "/a", relPrefix.String())
}

func TestZeroValues(t *testing.T) {
	t.Parallel()
	var key util.EtcdKey
	require.Equal(t, util.NewEtcdKey(""), key)
	require.Equal(t, "", key.String())
	require.Empty(t, key.Bytes())
	require.Equal(t, util.EtcdPrefix{}, key.Head())
	require.Equal(t, util.EtcdRelKey{}, key.Tail())
	require.Equal(t, util.EtcdRelKey{}, key.RemovePrefix(&util.EtcdPrefix{}))

	var prefix util.EtcdPrefix
	require.Equal(t, util.NormalizePrefix(""), prefix)
	require.Equal(t, util.NewEtcdKey("/a"), prefix.FullKey(util.NewEtcdRelKey("/a")))
	require.Equal(t, util.EtcdRelPrefix{}, prefix.Tail())

	var relKey util.EtcdRelKey
	require.Equal(t, util.EtcdRelPrefix{}, relKey.Head())
	require.Equal(t, util.EtcdRelPrefix{}, relKey.AsPrefix())
	require.Equal(t, util.EtcdRelKey{}, relKey.RemovePrefix(&util.EtcdRelPrefix{}))
	require.Equal(t, util.EtcdRelKey{}, relKey.RemovePrefix(nil))

	var relPrefix util.EtcdRelPrefix
	require.Equal(t, util.EtcdRelPrefix{}, relPrefix.Head())
	require.Equal(t, &util.EtcdPrefix{}, relPrefix.AsPrefix())
}

func TestEtcdKeyAsMapKey(t *testing.T) {
	t.Parallel()
	m := map[util.EtcdKey][]byte{
		util.NewEtcdKey("/a/b"): []byte("v1"),
		util.NewEtcdKey("/a/c"): []byte("v2"),
	}
	require.Equal(t, []byte("v1"), m[util.NewEtcdKeyFromBytes([]byte("/a/b"))])
	require.Equal(t, []byte("v2"), m[util.NewEtcdPrefix("/a").FullKey(util.NewEtcdRelKey("/c"))])
	_, ok := m[util.NewEtcdKey("/a")]
	require.False(t, ok)

	require.True(t, util.NewEtcdKey("/x") == util.NewEtcdKeyFromBytes([]byte("/x")))
	require.False(t, util.NewEtcdKey("/x") == util.NewEtcdKey("/y"))
}

func TestTypesAreOneStringHeader(t *testing.T) {
	t.Parallel()
	stringSize := unsafe.Sizeof("")
	require.Equal(t, stringSize, unsafe.Sizeof(util.EtcdKey{}))
	require.Equal(t, stringSize, unsafe.Sizeof(util.EtcdRelKey{}))
	require.Equal(t, stringSize, unsafe.Sizeof(util.EtcdPrefix{}))
	require.Equal(t, stringSize, unsafe.Sizeof(util.EtcdRelPrefix{}))
}

var (
	sinkKey    util.EtcdKey
	sinkPrefix util.EtcdPrefix
	sinkRelKey util.EtcdRelKey
)

func TestNewEtcdKeyFromBytesAllocs(t *testing.T) {
	b := []byte("/tidb/cdc/changefeed/info/some-changefeed")
	allocs := testing.AllocsPerRun(100, func() {
		sinkKey = util.NewEtcdKeyFromBytes(b)
	})
	require.LessOrEqual(t, allocs, 1.0)
}

func TestHeadTailDoNotAllocate(t *testing.T) {
	key := util.NewEtcdKey("/tidb/cdc/changefeed/info/some-changefeed")
	allocs := testing.AllocsPerRun(100, func() {
		sinkPrefix = key.Head()
		sinkRelKey = key.Tail()
	})
	require.Zero(t, allocs)
}

func ExampleNormalizePrefix() {
	for _, in := range []string{"", "/", "tidb/cdc", "/tidb/cdc/"} {
		fmt.Printf("%q -> %q\n", in, util.NormalizePrefix(in))
	}
	// Output:
	// "" -> ""
	// "/" -> ""
	// "tidb/cdc" -> "/tidb/cdc"
	// "/tidb/cdc/" -> "/tidb/cdc"
}

func ExampleEtcdKey_Head() {
	key := util.NewEtcdKey("/tidb/cdc/owner")
	fmt.Println(key.Head(), key.Tail())

	// A key without a second segment has an empty head and is its own tail.
	single := util.NewEtcdKey("/owner")
	fmt.Printf("%q %q\n", single.Head(), single.Tail())
	// Output:
	// /tidb /cdc/owner
	// "" "/owner"
}

func ExampleEtcdKey_RemovePrefix() {
	prefix := util.NormalizePrefix("tidb/cdc/")
	key := util.NewEtcdKey("/tidb/cdc/owner/1")
	rel := key.RemovePrefix(&prefix)
	fmt.Println(rel)
	fmt.Println(prefix.FullKey(rel) == key)
	// Output:
	// /owner/1
	// true
}

// TestPrefixDir: Dir is the prefix and one "/": what every key under the
// normalized prefix starts with.
func TestPrefixDir(t *testing.T) {
	t.Parallel()
	for in, want := range map[string]string{"/a": "/a/", "/a/b": "/a/b/", "": "/", "/": "/"} {
		require.Equal(t, want, util.NormalizePrefix(in).Dir(), "NormalizePrefix(%q).Dir()", in)
	}
	require.Equal(t, "/a//", util.NewEtcdPrefix("/a/").Dir(), "used as is, no normalizing")
}
