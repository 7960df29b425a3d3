"""The paper's method, one concept per file, named as in the paper (Sec. 3, 4.2):

    class_tokens      learnable class tokens, Eq. 2 (note 1)
    cf_bilstm         the CF-BiLSTM, Eq. 3-6 (notes 3, 21)
    patch_classifier  the patch classifier, Eq. 7 (note 4)
    network           the CPF-CTE network: ViT → class tokens → CF-BiLSTM → classifier
    topk_pooling      top-k pooling, Eq. 8 (and Table 5's average and max pooling)
    mce_loss          the MCE loss, Eq. 9
    bpm               the baseline pseudo mask, Eq. 10 (note 7)
    crf               the dense CRF (notes 8, 15)
    metrics           mIoU over a split (note 10), the classifier's mAP
    deeplabv2         DeepLabv2: network, MSC, its loss, init, schedule (notes 9, 14, 16)
    caffe_resnet      kazuto1011's Caffe-style ResNet-101, for his COCO-pretrained init

It imports only the machinery below it (``cpfcte.machinery``); the stages above run it.
"""
