package jsonstate

// DecodePolicy says what Update does with a value that does not decode.
type DecodePolicy int

const (
	// FailOnInvalid makes Update return the *DecodeError: the worker stops
	// and Run returns it, wrapped. The state is left unchanged. This is the
	// default.
	FailOnInvalid DecodePolicy = iota
	// SkipInvalid makes Update treat the document as absent and record the
	// error (State.Errors, Doc.Err) until the key gets a valid value or is
	// deleted. Update returns nil.
	SkipInvalid
)

// Option configures a State or a Doc.
type Option interface {
	apply(*options)
}

type optionFunc func(*options)

func (f optionFunc) apply(o *options) { f(o) }

type options struct {
	policy DecodePolicy
	filter func(name string) bool
}

func resolveOptions(opts []Option) options {
	var o options
	for _, opt := range opts {
		if opt != nil {
			opt.apply(&o)
		}
	}
	return o
}

// WithDecodePolicy sets what Update does with a value that does not decode.
// Default: FailOnInvalid.
func WithDecodePolicy(p DecodePolicy) Option {
	return optionFunc(func(o *options) { o.policy = p })
}

// WithNameFilter makes a State mirror only the documents whose name keep
// accepts; the others are ignored like keys outside the prefix (not decoded,
// not reported). For example, to skip nested keys:
//
//	jsonstate.WithNameFilter(func(name string) bool { return !strings.Contains(name, "/") })
//
// Default: every non-empty name. Doc ignores this option.
func WithNameFilter(keep func(name string) bool) Option {
	return optionFunc(func(o *options) { o.filter = keep })
}
