package jsonstate_test

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/etcdworker/orchestrator"
	"github.com/etcdworker/orchestrator/jsonstate"
	"github.com/etcdworker/orchestrator/util"
)

func TestDecodeErrors(t *testing.T) {
	t.Parallel()
	var syntaxErr *json.SyntaxError
	var typeErr *json.UnmarshalTypeError
	tests := []struct {
		name  string
		value []byte
		as    any // pointer to the decoder error type expected inside
	}{
		{"syntax", []byte(`{"addr":`), &syntaxErr},
		{"wrong type", []byte(`{"load":"high"}`), &typeErr},
		{"empty value", []byte{}, &syntaxErr},
	}
	for _, tt := range tests {
		t.Run(tt.name+"/fail", func(t *testing.T) {
			s := jsonstate.New[node]("/app/nodes")
			tester := orchestrator.NewReactorStateTester(t, s, map[string]string{"/app/nodes/a": `{"addr":"a"}`})
			err := tester.Update("/app/nodes/a", tt.value)
			require.ErrorIs(t, err, jsonstate.ErrDecode)
			require.ErrorAs(t, err, tt.as)
			var derr *jsonstate.DecodeError
			require.ErrorAs(t, err, &derr)
			require.Equal(t, "/app/nodes/a", derr.Key)
			// The state is unchanged and nothing was recorded.
			a, ok := s.Get("a")
			require.True(t, ok)
			require.Equal(t, "a", a.Addr)
			require.Empty(t, s.Errors())
		})
		t.Run(tt.name+"/skip", func(t *testing.T) {
			s := jsonstate.New[node]("/app/nodes", jsonstate.WithDecodePolicy(jsonstate.SkipInvalid))
			tester := orchestrator.NewReactorStateTester(t, s, map[string]string{
				"/app/nodes/a": `{"addr":"a"}`,
				"/app/nodes/b": `{"addr":"b"}`,
			})
			tester.MustUpdate("/app/nodes/b", tt.value)
			tester.MustUpdate("/app/nodes/a", tt.value)
			_, ok := s.Get("a")
			require.False(t, ok, "a broken document is absent")
			require.Equal(t, 0, s.Len())
			errs := s.Errors()
			require.Len(t, errs, 2)
			require.Equal(t, "/app/nodes/a", errs[0].Key)
			require.Equal(t, "/app/nodes/b", errs[1].Key)
			require.ErrorIs(t, errs[0], jsonstate.ErrDecode)
			require.ErrorAs(t, errs[0], tt.as)

			tester.MustUpdate("/app/nodes/a", []byte(`{"addr":"fixed"}`)) // fixed
			tester.MustUpdate("/app/nodes/b", nil)                        // deleted
			require.Empty(t, s.Errors())
			a, ok := s.Get("a")
			require.True(t, ok)
			require.Equal(t, "fixed", a.Addr)
		})
	}
}

func TestPatchOnBrokenDocument(t *testing.T) {
	t.Parallel()
	s := jsonstate.New[node]("/app/nodes", jsonstate.WithDecodePolicy(jsonstate.SkipInvalid))
	tester := orchestrator.NewReactorStateTester(t, s, map[string]string{"/app/nodes/a": `garbage`})
	require.Len(t, s.Errors(), 1)

	s.Patch("a", func(n *node, _ bool) (bool, error) { n.Load++; return true, nil })
	_, err := tester.ApplyPatches()
	require.ErrorIs(t, err, jsonstate.ErrDecode)

	s.DeleteIf("a", func(node) (bool, error) { return true, nil })
	_, err = tester.ApplyPatches()
	require.ErrorIs(t, err, jsonstate.ErrDecode)
	require.Equal(t, map[string]string{"/app/nodes/a": `garbage`}, tester.KVEntries())

	// Put does not read the old value: it repairs the document.
	s.Put("a", node{Addr: "a"})
	tester.MustApplyPatches()
	require.Empty(t, s.Errors())
	a, ok := s.Get("a")
	require.True(t, ok)
	require.Equal(t, "a", a.Addr)
}

func TestDocDecodesPatchesAndIgnoresOtherKeys(t *testing.T) {
	t.Parallel()
	type config struct {
		Replicas int    `json:"replicas"`
		Mode     string `json:"mode,omitempty"`
	}
	d := jsonstate.NewDoc[config]("/app/config")
	require.Equal(t, util.NewEtcdKey("/app/config"), d.Key())
	tester := orchestrator.NewReactorStateTester(t, d, map[string]string{
		"/app/config/x": `not json`, // other keys are ignored
		"/app/configs":  `not json`,
	})
	_, ok := d.Get()
	require.False(t, ok)

	d.Patch(func(c *config, exists bool) (bool, error) {
		require.False(t, exists)
		c.Replicas = 3
		return true, nil
	})
	tester.MustApplyPatches()
	c, ok := d.Get()
	require.True(t, ok)
	require.Equal(t, config{Replicas: 3}, c)

	d.QueueGroup(
		d.PatchOp(func(c *config, _ bool) (bool, error) { c.Replicas++; return true, nil }),
		d.PatchOp(func(c *config, _ bool) (bool, error) { c.Mode = "fast"; return true, nil }),
	)
	d.QueueGroup() // empty: not queued
	tester.MustApplyPatches()
	require.Equal(t, `{"replicas":4,"mode":"fast"}`, tester.KVEntries()["/app/config"])

	d.Put(config{Replicas: 1})
	tester.MustApplyPatches()
	c, _ = d.Get()
	require.Equal(t, config{Replicas: 1}, c)

	d.Delete()
	tester.MustApplyPatches()
	_, ok = d.Get()
	require.False(t, ok)
	require.Equal(t, map[string]string{"/app/config/x": `not json`, "/app/configs": `not json`}, tester.KVEntries())

	// Decode policies.
	err := tester.Update("/app/config", []byte(`[1]`))
	require.ErrorIs(t, err, jsonstate.ErrDecode)
	require.NoError(t, d.Err())

	skip := jsonstate.NewDoc[config]("/app/config", jsonstate.WithDecodePolicy(jsonstate.SkipInvalid))
	st := orchestrator.NewReactorStateTester(t, skip, map[string]string{"/app/config": `{"replicas":2}`})
	st.MustUpdate("/app/config", []byte(`{`))
	_, ok = skip.Get()
	require.False(t, ok)
	require.ErrorIs(t, skip.Err(), jsonstate.ErrDecode)
	st.MustUpdate("/app/config", nil)
	require.NoError(t, skip.Err())
}
