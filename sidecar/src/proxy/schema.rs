//! The request schema: every body field the upstream accepts on each inspected route, with
//! what the sidecar does with it. Bodies are closed by default: a top-level field that is in
//! no table (and not opted in by the tenant's `extra_fields`) is refused as `unknown_field`,
//! so nothing the sidecar does not understand reaches the upstream.
//!
//! The tables are the union of the request models of vLLM, SGLang and the OpenAI API at the
//! versions in [`PINNED`] (each file's commit is in the test data); `sidecar/tests/schema.rs` checks that every field of those models
//! (listed in `sidecar/tests/data/upstream_fields.txt`) has a class here, and that
//! sidecar/README.md's table lists the same classes.

/// Prompt tokens charged for one image, audio, video or file part when `[model]` names none.
pub const DEFAULT_MEDIA_TOKENS: u64 = 4096;

/// The upstream versions the tables were read from.
pub const PINNED: &[(&str, &str)] = &[
    ("vllm", "002032ee2b18e1f7bd924ec47b62504ba3866063"),
    ("sglang", "004c82e07d876f6e4a0ad6e15325706b0f478f1a"),
    ("openai-python", "04448952820aa3029e61907c1785a7293c3ddbc2"),
];

/// Which request model a body follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Body {
    Chat,
    Completions,
    Responses,
    Embeddings,
    Score,
    Rerank,
    Classify,
    Pooling,
    Tokenize,
    Detokenize,
}

impl Body {
    pub const ALL: [Body; 10] = [
        Body::Chat,
        Body::Completions,
        Body::Responses,
        Body::Embeddings,
        Body::Score,
        Body::Rerank,
        Body::Classify,
        Body::Pooling,
        Body::Tokenize,
        Body::Detokenize,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Body::Chat => "chat",
            Body::Completions => "completions",
            Body::Responses => "responses",
            Body::Embeddings => "embeddings",
            Body::Score => "score",
            Body::Rerank => "rerank",
            Body::Classify => "classify",
            Body::Pooling => "pooling",
            Body::Tokenize => "tokenize",
            Body::Detokenize => "detokenize",
        }
    }

    /// The route's fields, sorted by name.
    pub fn fields(self) -> &'static [(&'static str, Class)] {
        match self {
            Body::Chat => CHAT,
            Body::Completions => COMPLETIONS,
            Body::Responses => RESPONSES,
            Body::Embeddings => EMBEDDINGS,
            Body::Score => SCORE,
            Body::Rerank => RERANK,
            Body::Classify => CLASSIFY,
            Body::Pooling => POOLING,
            Body::Tokenize => TOKENIZE,
            Body::Detokenize => DETOKENIZE,
        }
    }

    /// The class of `field` on this route; `None` for a field the upstream does not accept.
    pub fn class(self, field: &str) -> Option<Class> {
        let f = self.fields();
        f.binary_search_by(|(n, _)| (*n).cmp(field))
            .ok()
            .map(|i| f[i].1)
    }

    /// Whether the upstream's model has `field` on this route.
    pub fn has(self, field: &str) -> bool {
        self.class(field).is_some()
    }
}

/// What the sidecar does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// Text or content the model reads: counted in the prompt estimate, scanned for other
    /// tenants' canaries and keywords, hashed for the audit record.
    Prompt,
    /// Tool declarations: prompt-bearing (the chat template renders them) and held to the
    /// credential's tool scope.
    Tools,
    /// The credential's scope: the model, and the tool a request forces.
    Scope,
    /// Sizes the work: read into the reservation (completion limit x choices x prompts).
    Size,
    /// Read and normalised by the sidecar (`stream`, `stream_options`).
    Stream,
    /// Steers the engine for every tenant or names its shared state: owned by the sidecar.
    Engine(Engine),
    /// Forwarded as written (sampling and formatting knobs).
    Pass,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Prompt => "prompt",
            Class::Tools => "tools",
            Class::Scope => "scope",
            Class::Size => "size",
            Class::Stream => "stream",
            Class::Engine(e) => e.as_str(),
            Class::Pass => "passthrough",
        }
    }
}

/// The engine-control fields, each with the sidecar's rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Engine {
    /// `cache_salt`: the client's removed; the tenant's set on salted routes.
    Salt,
    /// The engine's request id (`request_id`, SGLang's `rid`): the client's replaced by the
    /// sidecar's own id.
    RequestId,
    /// `priority`: set from `tenants.<name>.priority`; a client value is refused.
    Priority,
    /// Refused unless the tenant lists the field in `trusted_engine_fields`
    /// (`kv_transfer_params`, template overrides, adapter selectors outside `model`, ...).
    Trusted,
    /// `previous_response_id`: only an id this sidecar handed to the same tenant.
    PreviousResponse,
    /// `store`: only where `tenants.<name>.store_responses = true`; `false` written otherwise.
    Store,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Salt => "engine:salt",
            Engine::RequestId => "engine:request-id",
            Engine::Priority => "engine:priority",
            Engine::Trusted => "engine:trusted",
            Engine::PreviousResponse => "engine:previous-response",
            Engine::Store => "engine:store",
        }
    }
}

use Class::{Pass, Prompt, Scope, Size, Stream, Tools};
const SALT: Class = Class::Engine(Engine::Salt);
const RID: Class = Class::Engine(Engine::RequestId);
const PRIO: Class = Class::Engine(Engine::Priority);
const TRUSTED: Class = Class::Engine(Engine::Trusted);

/// `/v1/chat/completions`.
pub const CHAT: &[(&str, Class)] = &[
    ("add_generation_prompt", Pass),
    ("add_special_tokens", Pass),
    ("allowed_token_ids", Pass),
    ("audio", Pass),
    ("bad_words", Pass),
    ("best_of", Size),
    ("bootstrap_host", TRUSTED),
    ("bootstrap_port", TRUSTED),
    ("bootstrap_room", TRUSTED),
    ("cache_salt", SALT),
    ("chat_template", TRUSTED),
    ("chat_template_kwargs", Prompt),
    ("continue_final_message", Pass),
    ("custom_logit_processor", TRUSTED),
    ("custom_params", TRUSTED),
    ("data_parallel_rank", TRUSTED),
    ("disagg_prefill_dp_rank", TRUSTED),
    ("documents", Prompt),
    ("ebnf", Pass),
    ("ec_transfer_params", TRUSTED),
    ("echo", Pass),
    ("extra_key", TRUSTED),
    ("frequency_penalty", Pass),
    ("function_call", Scope),
    ("functions", Tools),
    ("guided_choice", Pass),
    ("guided_decoding_backend", Pass),
    ("guided_grammar", Pass),
    ("guided_json", Pass),
    ("guided_regex", Pass),
    ("guided_whitespace_pattern", Pass),
    ("ignore_eos", Pass),
    ("images_config", TRUSTED),
    ("include_reasoning", Pass),
    ("include_stop_str_in_output", Pass),
    ("input_ids", Prompt),
    ("kv_transfer_params", TRUSTED),
    ("length_penalty", Pass),
    ("logit_bias", Pass),
    ("logits_processors", TRUSTED),
    ("logprob_token_ids", Pass),
    ("logprobs", Pass),
    ("lora_path", TRUSTED),
    ("max_completion_tokens", Size),
    ("max_dynamic_patch", TRUSTED),
    ("max_tokens", Size),
    ("media_io_kwargs", TRUSTED),
    ("messages", Prompt),
    ("metadata", Pass),
    ("min_dynamic_patch", TRUSTED),
    ("min_p", Pass),
    ("min_tokens", Pass),
    ("mm_processor_kwargs", TRUSTED),
    ("modalities", Pass),
    ("model", Scope),
    ("n", Size),
    ("ngram_corpus_id", TRUSTED),
    ("no_stop_trim", Pass),
    ("parallel_tool_calls", Pass),
    ("prediction", Prompt),
    ("presence_penalty", Pass),
    ("priority", PRIO),
    ("prompt_logprobs", Pass),
    ("reasoning", Pass),
    ("reasoning_effort", Pass),
    ("regex", Pass),
    ("repetition_detection", Pass),
    ("repetition_penalty", Pass),
    ("request_id", RID),
    ("response_format", Pass),
    ("return_cached_tokens_details", TRUSTED),
    ("return_hidden_states", TRUSTED),
    ("return_meta_info", TRUSTED),
    ("return_mm_kwargs", TRUSTED),
    ("return_prompt_text", TRUSTED),
    ("return_prompt_token_ids", Pass),
    ("return_routed_experts", TRUSTED),
    ("return_token_ids", Pass),
    ("return_token_offsets", Pass),
    ("return_tokens_as_token_ids", Pass),
    ("rid", RID),
    ("routed_dp_rank", TRUSTED),
    ("routed_experts_prompt_start", TRUSTED),
    ("routed_experts_start_len", TRUSTED),
    ("seed", Pass),
    ("separate_reasoning", Pass),
    ("service_tier", Pass),
    ("session_id", TRUSTED),
    ("session_params", TRUSTED),
    ("skip_special_tokens", Pass),
    ("spaces_between_special_tokens", Pass),
    ("stop", Pass),
    ("stop_regex", Pass),
    ("stop_token_ids", Pass),
    ("store", Pass),
    ("stream", Stream),
    ("stream_interval", Pass),
    ("stream_options", Stream),
    ("stream_reasoning", Pass),
    ("structural_tag", Pass),
    ("structured_outputs", Pass),
    ("task", Prompt),
    ("temperature", Pass),
    ("thinking_token_budget", Pass),
    ("tool_choice", Scope),
    ("tools", Tools),
    ("top_k", Pass),
    ("top_logprobs", Pass),
    ("top_p", Pass),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_audio_in_video", TRUSTED),
    ("use_beam_search", Pass),
    ("user", Pass),
    ("vllm_xargs", TRUSTED),
    ("watermarking", Pass),
    ("web_search_options", TRUSTED),
];

/// `/v1/completions`.
pub const COMPLETIONS: &[(&str, Class)] = &[
    ("add_special_tokens", Pass),
    ("allowed_token_ids", Pass),
    ("bad_words", Pass),
    ("best_of", Size),
    ("bootstrap_host", TRUSTED),
    ("bootstrap_port", TRUSTED),
    ("bootstrap_room", TRUSTED),
    ("cache_salt", SALT),
    ("custom_labels", TRUSTED),
    ("custom_logit_processor", TRUSTED),
    ("custom_params", TRUSTED),
    ("data_parallel_rank", TRUSTED),
    ("disagg_prefill_dp_rank", TRUSTED),
    ("ebnf", Pass),
    ("ec_transfer_params", TRUSTED),
    ("echo", Pass),
    ("extra_key", TRUSTED),
    ("frequency_penalty", Pass),
    ("guided_choice", Pass),
    ("guided_decoding_backend", Pass),
    ("guided_grammar", Pass),
    ("guided_json", Pass),
    ("guided_regex", Pass),
    ("guided_whitespace_pattern", Pass),
    ("ignore_eos", Pass),
    ("images_config", TRUSTED),
    ("include_stop_str_in_output", Pass),
    ("json_schema", Pass),
    ("kv_transfer_params", TRUSTED),
    ("length_penalty", Pass),
    ("logit_bias", Pass),
    ("logits_processors", TRUSTED),
    ("logprob_token_ids", Pass),
    ("logprobs", Pass),
    ("lora_path", TRUSTED),
    ("max_tokens", Size),
    ("min_p", Pass),
    ("min_tokens", Pass),
    ("model", Scope),
    ("n", Size),
    ("ngram_corpus_id", TRUSTED),
    ("no_stop_trim", Pass),
    ("presence_penalty", Pass),
    ("priority", PRIO),
    ("prompt", Prompt),
    ("prompt_embeds", TRUSTED),
    ("prompt_logprobs", Pass),
    ("regex", Pass),
    ("repetition_detection", Pass),
    ("repetition_penalty", Pass),
    ("request_id", RID),
    ("response_format", Pass),
    ("return_cached_tokens_details", TRUSTED),
    ("return_hidden_states", TRUSTED),
    ("return_mm_kwargs", TRUSTED),
    ("return_routed_experts", TRUSTED),
    ("return_token_ids", Pass),
    ("return_token_offsets", Pass),
    ("return_tokens_as_token_ids", Pass),
    ("rid", RID),
    ("routed_dp_rank", TRUSTED),
    ("routed_experts_prompt_start", TRUSTED),
    ("routed_experts_start_len", TRUSTED),
    ("seed", Pass),
    ("session_id", TRUSTED),
    ("session_params", TRUSTED),
    ("skip_special_tokens", Pass),
    ("spaces_between_special_tokens", Pass),
    ("stop", Pass),
    ("stop_regex", Pass),
    ("stop_token_ids", Pass),
    ("stream", Stream),
    ("stream_interval", Pass),
    ("stream_options", Stream),
    ("structural_tag", Pass),
    ("structured_outputs", Pass),
    ("suffix", Prompt),
    ("temperature", Pass),
    ("thinking_token_budget", Pass),
    ("top_k", Pass),
    ("top_p", Pass),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_beam_search", Pass),
    ("user", Pass),
    ("vllm_xargs", TRUSTED),
    ("watermarking", Pass),
];

/// `/v1/responses`.
pub const RESPONSES: &[(&str, Class)] = &[
    ("background", TRUSTED),
    ("cache_salt", SALT),
    ("chat_template_kwargs", Prompt),
    ("conversation", TRUSTED),
    ("enable_response_messages", TRUSTED),
    ("extra_key", TRUSTED),
    ("frequency_penalty", Pass),
    ("ignore_eos", Pass),
    ("include", Pass),
    ("include_stop_str_in_output", Pass),
    ("input", Prompt),
    ("instructions", Prompt),
    ("logit_bias", Pass),
    ("max_output_tokens", Size),
    ("max_tool_calls", Pass),
    ("metadata", Pass),
    ("min_p", Pass),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("ngram_corpus_id", TRUSTED),
    ("parallel_tool_calls", Pass),
    ("presence_penalty", Pass),
    ("previous_input_messages", Prompt),
    ("previous_response", Prompt),
    (
        "previous_response_id",
        Class::Engine(Engine::PreviousResponse),
    ),
    ("priority", PRIO),
    ("prompt", TRUSTED),
    ("prompt_cache_key", TRUSTED),
    ("prompt_cache_retention", TRUSTED),
    ("reasoning", Pass),
    ("repetition_penalty", Pass),
    ("request_id", RID),
    ("safety_identifier", Pass),
    ("seed", Pass),
    ("service_tier", Pass),
    ("session_id", TRUSTED),
    ("skip_special_tokens", Pass),
    ("stop", Pass),
    ("store", Class::Engine(Engine::Store)),
    ("stream", Stream),
    ("stream_options", Stream),
    ("structured_outputs", Pass),
    ("temperature", Pass),
    ("text", Pass),
    ("tool_choice", Scope),
    ("tools", Tools),
    ("top_k", Pass),
    ("top_logprobs", Pass),
    ("top_p", Pass),
    ("truncation", Pass),
    ("user", Pass),
    ("vllm_xargs", TRUSTED),
];

/// `/v1/embeddings` (the completion-style and the chat-style request).
pub const EMBEDDINGS: &[(&str, Class)] = &[
    ("add_generation_prompt", Pass),
    ("add_special_tokens", Pass),
    ("cache_salt", SALT),
    ("chat_template", TRUSTED),
    ("chat_template_kwargs", Prompt),
    ("continue_final_message", Pass),
    ("dimensions", Pass),
    ("embed_dtype", Pass),
    ("embed_override_token_id", TRUSTED),
    ("embed_overrides", TRUSTED),
    ("encoding_format", Pass),
    ("endianness", Pass),
    ("input", Prompt),
    ("lora_path", TRUSTED),
    ("media_io_kwargs", TRUSTED),
    ("messages", Prompt),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("normalize", Pass),
    ("padding", Pass),
    ("priority", PRIO),
    ("request_id", RID),
    ("rid", RID),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_activation", Pass),
    ("user", Pass),
];

/// `/v1/score` (every input spelling: `queries`/`documents`/`items`, `data_1`/`data_2`, `text_1`/`text_2`, SGLang's `query`/`items`).
pub const SCORE: &[(&str, Class)] = &[
    ("apply_softmax", Pass),
    ("cache_salt", SALT),
    ("data_1", Prompt),
    ("data_2", Prompt),
    ("documents", Prompt),
    ("embed_override_token_id", TRUSTED),
    ("item_embed_overrides", TRUSTED),
    ("item_first", Pass),
    ("items", Prompt),
    ("label_token_ids", Pass),
    ("max_tokens_per_doc", Pass),
    ("max_tokens_per_query", Pass),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("padding", Pass),
    ("priority", PRIO),
    ("queries", Prompt),
    ("query", Prompt),
    ("query_embed_overrides", TRUSTED),
    ("request_id", RID),
    ("return_pooled_hidden_states", TRUSTED),
    ("text_1", Prompt),
    ("text_2", Prompt),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_activation", Pass),
    ("user", Pass),
];

/// `/v1/rerank`.
pub const RERANK: &[(&str, Class)] = &[
    ("cache_salt", SALT),
    ("documents", Prompt),
    ("instruct", Prompt),
    ("max_tokens_per_doc", Pass),
    ("max_tokens_per_query", Pass),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("padding", Pass),
    ("priority", PRIO),
    ("query", Prompt),
    ("request_id", RID),
    ("return_documents", Pass),
    ("top_n", Pass),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_activation", Pass),
    ("user", Pass),
];

/// `/v1/classify` (the completion-style and the chat-style request).
pub const CLASSIFY: &[(&str, Class)] = &[
    ("add_generation_prompt", Pass),
    ("add_special_tokens", Pass),
    ("cache_salt", SALT),
    ("chat_template", TRUSTED),
    ("chat_template_kwargs", Prompt),
    ("continue_final_message", Pass),
    ("input", Prompt),
    ("media_io_kwargs", TRUSTED),
    ("messages", Prompt),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("padding", Pass),
    ("priority", PRIO),
    ("request_id", RID),
    ("rid", RID),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_activation", Pass),
    ("user", Pass),
];

/// `/v1/pooling` (the completion-style, chat-style and plugin requests).
pub const POOLING: &[(&str, Class)] = &[
    ("add_generation_prompt", Pass),
    ("add_special_tokens", Pass),
    ("cache_salt", SALT),
    ("chat_template", TRUSTED),
    ("chat_template_kwargs", Prompt),
    ("continue_final_message", Pass),
    ("data", TRUSTED),
    ("dimensions", Pass),
    ("embed_dtype", Pass),
    ("encoding_format", Pass),
    ("endianness", Pass),
    ("input", Prompt),
    ("media_io_kwargs", TRUSTED),
    ("messages", Prompt),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("padding", Pass),
    ("priority", PRIO),
    ("request_id", RID),
    ("task", Pass),
    ("truncate_prompt_tokens", Pass),
    ("truncation_side", Pass),
    ("use_activation", Pass),
    ("user", Pass),
];

/// `/v1/tokenize` (the completion-style and the chat-style request).
pub const TOKENIZE: &[(&str, Class)] = &[
    ("add_generation_prompt", Pass),
    ("add_special_tokens", Pass),
    ("chat_template", TRUSTED),
    ("chat_template_kwargs", Prompt),
    ("continue_final_message", Pass),
    ("messages", Prompt),
    ("mm_processor_kwargs", TRUSTED),
    ("model", Scope),
    ("prompt", Prompt),
    ("reasoning_effort", Pass),
    ("return_token_strs", Pass),
    ("tool_choice", Scope),
    ("tools", Tools),
];

/// `/v1/detokenize`.
pub const DETOKENIZE: &[(&str, Class)] = &[
    ("model", Scope),
    ("skip_special_tokens", Pass),
    ("tokens", Prompt),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_is_sorted_and_has_one_entry_a_field() {
        for body in Body::ALL {
            let f = body.fields();
            for w in f.windows(2) {
                assert!(
                    w[0].0 < w[1].0,
                    "{}: {} before {}",
                    body.as_str(),
                    w[0].0,
                    w[1].0
                );
            }
            for (name, class) in f {
                assert_eq!(body.class(name), Some(*class), "{name}");
            }
            assert_eq!(body.class("no_such_field"), None);
        }
    }

    #[test]
    fn every_model_route_names_its_model_and_carries_a_prompt() {
        for body in Body::ALL {
            assert_eq!(body.class("model"), Some(Class::Scope), "{}", body.as_str());
            assert!(
                body.fields()
                    .iter()
                    .any(|(_, c)| *c == Class::Prompt || *c == Class::Tools),
                "{}",
                body.as_str()
            );
        }
    }

    #[test]
    fn names_are_the_ones_the_docs_and_the_test_data_use() {
        let names: Vec<&str> = Body::ALL.iter().map(|b| b.as_str()).collect();
        assert_eq!(
            names,
            [
                "chat",
                "completions",
                "responses",
                "embeddings",
                "score",
                "rerank",
                "classify",
                "pooling",
                "tokenize",
                "detokenize"
            ]
        );
        let classes = [
            Class::Prompt,
            Class::Tools,
            Class::Scope,
            Class::Size,
            Class::Stream,
            Class::Engine(Engine::Salt),
            Class::Engine(Engine::RequestId),
            Class::Engine(Engine::Priority),
            Class::Engine(Engine::Trusted),
            Class::Engine(Engine::PreviousResponse),
            Class::Engine(Engine::Store),
            Class::Pass,
        ];
        let names: Vec<&str> = classes.iter().map(|c| c.as_str()).collect();
        assert_eq!(
            names,
            [
                "prompt",
                "tools",
                "scope",
                "size",
                "stream",
                "engine:salt",
                "engine:request-id",
                "engine:priority",
                "engine:trusted",
                "engine:previous-response",
                "engine:store",
                "passthrough"
            ]
        );
    }
}
