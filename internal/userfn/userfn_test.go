package userfn

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestCallTurnsAPanicIntoErrPanic(t *testing.T) {
	t.Parallel()
	mine := errors.New("mine")
	tests := []struct {
		name    string
		fn      func() (int, error)
		want    int
		wantErr error
		inMsg   string
	}{
		{name: "returns", fn: func() (int, error) { return 7, nil }, want: 7},
		{name: "its own error", fn: func() (int, error) { return 0, mine }, wantErr: mine},
		{name: "panics", fn: func() (int, error) { panic("boom") }, wantErr: ErrPanic, inMsg: "Tick: boom"},
		{name: "panics with an error", fn: func() (int, error) { panic(mine) }, wantErr: ErrPanic, inMsg: "Tick: mine"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Call("Tick", tc.fn)
			if tc.wantErr == nil {
				require.NoError(t, err)
				require.Equal(t, tc.want, got)
				return
			}
			require.ErrorIs(t, err, tc.wantErr)
			require.Contains(t, err.Error(), tc.inMsg)
			if errors.Is(err, ErrPanic) {
				require.Contains(t, err.Error(), "userfn_test.go", "the stack is in the message")
				require.NotErrorIs(t, err, mine, "a panic value is not wrapped")
			}
		})
	}
}

func TestDo(t *testing.T) {
	t.Parallel()
	require.NoError(t, Do("OnElected", func() {}))
	err := Do("OnElected", func() { panic("boom") })
	require.ErrorIs(t, err, ErrPanic)
	require.Contains(t, err.Error(), "OnElected: boom")
}
