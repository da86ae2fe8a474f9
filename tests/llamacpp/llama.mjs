// llama.cpp, through node-llama-cpp's prebuilt CPU binary, for quill's GGUF checks.
//
//   node llama.mjs REQUEST.json      -> one JSON object on stdout
//
// REQUEST: {"model": PATH, "threads": N, "context": N, "ops": [OP, ...]}, each OP one of
//   {"op": "tokenize", "text": S}                          -> {"ids": [...]} (special tokens as plain text)
//   {"op": "greedy", "ids": [...], "n": N, "window": W}    -> {"ids": [...]} N tokens, temperature 0, EOG ignored,
//                                                             past W tokens the window moves as quill sample's does
//   {"op": "logprobs", "ids": [...]}                       -> {"logprobs": [...]} log p(ids[i+1] | ids[..i])
//   {"op": "chat", "messages": [...], "max_tokens": N}     -> {"text": S, "wrapper": NAME, "prompt_ids": [...]}
//   {"op": "template", "messages": [...], "tools": [...]} -> {"text", "ids"} or {"error"}: llama.cpp's own Jinja engine
//   {"op": "decode_speed", "ids": [...], "n": N}           -> {"seconds": S, "tokens": N} greedy decode after the prompt
//   {"op": "meta", "ids": [...]}                           -> {"vocab_type", "eos", "bos", "template", "is_eog": [...]}
import {readFileSync} from "node:fs";
import {getLlama, LlamaChatSession, JinjaTemplateChatWrapper} from "node-llama-cpp";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: "error", progressLogs: false});
const model = await llama.loadModel({modelPath: request.model, gpuLayers: 0});
// One slot more than the model's context: node-llama-cpp shifts a full context by itself before its
// last slot is used. Positions stay below the model's context all the same (`greedy` moves its window first).
const slots = (request.context ?? 256) + 1;
const context = await model.createContext({contextSize: slots, threads: request.threads ?? 1, batchSize: slots,
                                            sequences: 1});
const sequence = context.getSequence();

async function greedy(ids, n, window) {
    // Greedy decoding; past `window` tokens (the model's block_size) the window moves as quill's
    // default overflow does: keep its last window/2 tokens and prefill them afresh at position 0.
    const keep = Math.max(1, Math.floor(window / 2));
    const all = [...ids];
    let start = 0;
    let pending = [...ids];
    const out = [];
    await sequence.clearHistory();
    while (out.length < n) {
        const items = pending.map((t, i) => i === pending.length - 1
            ? [t, {generateNext: {token: true, options: {temperature: 0}}}] : t);
        const results = await sequence.controlledEvaluate(items);
        const token = results[results.length - 1].next.token;
        out.push(token);
        all.push(token);
        if (all.length - start > window) {
            start = all.length - keep;
            await sequence.clearHistory();
            pending = all.slice(start);
        } else {
            pending = [token];
        }
    }
    return out;
}

async function logprobs(ids) {
    await sequence.clearHistory();
    const items = ids.slice(0, -1).map(t => [t, {generateNext: {probabilities: true, options: {temperature: 1, topK: 0, topP: 1, minP: 0}}}]);
    const outputs = await sequence.controlledEvaluate(items);
    return outputs.map((o, i) => Math.log(o.next.probabilities.get(ids[i + 1]) ?? 0));
}

async function chat(messages, maxTokens) {
    await sequence.clearHistory();
    const system = messages.find(m => m.role === "system");
    const rest = messages.filter(m => m.role !== "system");
    const session = new LlamaChatSession({contextSequence: sequence, systemPrompt: system ? system.content : "",
                                          autoDisposeSequence: false});
    const history = [];
    if (system) history.push({type: "system", text: system.content});
    for (let i = 0; i + 1 < rest.length; i += 2)
        history.push({type: "user", text: rest[i].content}, {type: "model", response: [rest[i + 1].content]});
    session.setChatHistory(history);
    const last = rest[rest.length - 1].content;
    const text = await session.prompt(last, {temperature: 0, maxTokens});
    const wrapper = session.chatWrapper;
    const rendered = wrapper.generateContextState({chatHistory: [...history, {type: "user", text: last}, {type: "model", response: []}]});
    const promptIds = rendered.contextText.tokenize(model.tokenizer);
    session.dispose({disposeSequence: false});
    return {text, wrapper: wrapper.wrapperName, jinja: wrapper instanceof JinjaTemplateChatWrapper, prompt_ids: promptIds};
}

function nativeTemplate(messages, tools) {
    // llama.cpp's own Jinja engine (common/jinja, as llama-server and llama-cli run templates)
    const template = model.fileInfo.metadata?.tokenizer?.chat_template;
    const renderer = new llama._bindings.AddonJinjaRenderer(template);
    try {
        const text = renderer.render({messages, tools, add_generation_prompt: true, bos_token: "", eos_token: ""});
        return {text, ids: Array.from(model.tokenize(text, true))};
    } catch (error) {
        return {error: String(error.message).split("\n").find(line => line.includes("Jinja Exception")) ?? String(error)};
    }
}

async function decodeSpeed(ids, n) {
    await sequence.clearHistory();
    let count = 0;
    const start = process.hrtime.bigint();
    let first = null;
    for await (const token of sequence.evaluate(ids, {temperature: 0})) {
        if (first === null) first = process.hrtime.bigint();  // the prompt is in; time the decode steps
        count++;
        if (count > n) break;
    }
    const end = process.hrtime.bigint();
    return {seconds: Number(end - first) / 1e9, tokens: count - 1, prefill_seconds: Number(first - start) / 1e9};
}

const results = [];
for (const op of request.ops) {
    if (op.op === "tokenize") results.push({ids: Array.from(model.tokenize(op.text, false))});
    else if (op.op === "greedy") results.push({ids: await greedy(op.ids, op.n, op.window ?? request.context ?? 256)});
    else if (op.op === "logprobs") results.push({logprobs: await logprobs(op.ids)});
    else if (op.op === "chat") results.push(await chat(op.messages, op.max_tokens ?? 64));
    else if (op.op === "template") results.push(nativeTemplate(op.messages, op.tools ?? null));
    else if (op.op === "decode_speed") results.push(await decodeSpeed(op.ids, op.n));
    else if (op.op === "meta") results.push({
        vocab_type: model.fileInfo.metadata?.tokenizer?.ggml?.model,
        eos: model.tokens.eos, bos: model.tokens.bos,
        template: model.fileInfo.metadata?.tokenizer?.chat_template ?? null,
        is_eog: (op.ids ?? []).map(t => model.isEogToken(t)),
        train_context: model.trainContextSize,
    });
    else throw new Error(`unknown op ${op.op}`);
}
process.stdout.write(JSON.stringify({results}) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
